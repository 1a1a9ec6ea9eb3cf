//! Result rows, percentiles, the text table and the latency CDF picture.

use std::time::Duration;

/// One measured number.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: &'static str,
    pub metric: String,
    pub value: f64,
    pub unit: &'static str,
    /// The goal, as text (empty when there is none).
    pub goal: String,
    /// Whether the goal was met (None without a goal).
    pub met: Option<bool>,
}

impl Row {
    pub fn new(
        scenario: &'static str,
        metric: impl Into<String>,
        value: f64,
        unit: &'static str,
    ) -> Row {
        Row {
            scenario,
            metric: metric.into(),
            value,
            unit,
            goal: String::new(),
            met: None,
        }
    }

    /// Adds a goal "≤ limit".
    pub fn at_most(mut self, limit: f64) -> Row {
        self.goal = format!("≤ {}", fmt(limit));
        self.met = Some(self.value <= limit);
        self
    }

    /// A row back from [`Row::json`] (scenario and unit are leaked: a short-lived CLI).
    pub fn from_json(v: &serde_json::Value) -> Option<Row> {
        let text = |k: &str| v.get(k).and_then(serde_json::Value::as_str);
        let leak = |s: &str| -> &'static str { Box::leak(s.to_string().into_boxed_str()) };
        Some(Row {
            scenario: leak(text("scenario")?),
            metric: text("metric")?.to_string(),
            value: v
                .get("value")
                .and_then(serde_json::Value::as_f64)
                .unwrap_or(f64::NAN),
            unit: leak(text("unit").unwrap_or("")),
            goal: text("goal").unwrap_or("").to_string(),
            met: v.get("met").and_then(serde_json::Value::as_bool),
        })
    }

    pub fn at_least(mut self, limit: f64) -> Row {
        self.goal = format!("≥ {}", fmt(limit));
        self.met = Some(self.value >= limit);
        self
    }

    pub fn line(&self) -> String {
        format!(
            "{:<12} {:<48} {:>12} {:<5} {:<10} {}",
            self.scenario,
            self.metric,
            fmt(self.value),
            self.unit,
            self.goal,
            match self.met {
                Some(true) => "met",
                Some(false) => "MISSED",
                None => "",
            }
        )
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::json!({"scenario": self.scenario, "metric": self.metric, "value": self.value, "unit": self.unit, "goal": self.goal, "met": self.met})
    }
}

fn fmt(v: f64) -> String {
    if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The p-th percentile (0..=100) of `values` (nearest rank).
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil().max(1.0) as usize;
    v[rank.min(v.len()) - 1]
}

/// Markdown table of all rows.
pub fn table(rows: &[Row], machine: &str) -> String {
    let mut out = format!("Machine: {machine}\n\n| scenario | metric | value | unit | goal | |\n|---|---|---:|---|---|---|\n");
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} |\n",
            r.scenario,
            r.metric,
            fmt(r.value),
            r.unit,
            r.goal,
            match r.met {
                Some(true) => "met",
                Some(false) => "**missed**",
                None => "",
            }
        ));
    }
    out
}

/// An SVG of the empirical CDF of each named latency series (ms, log x axis).
pub fn cdf_svg(series: &[(String, Vec<f64>)]) -> String {
    let (w, h, left, bottom) = (720.0, 420.0, 60.0, 50.0);
    let all: Vec<f64> = series
        .iter()
        .flat_map(|(_, v)| v.iter().copied())
        .filter(|x| *x > 0.0)
        .collect();
    let min = all.iter().copied().fold(f64::INFINITY, f64::min).max(0.01);
    let max = all.iter().copied().fold(0.0, f64::max).max(min * 10.0);
    let (lmin, lmax) = (min.log10().floor(), max.log10().ceil());
    let x = |v: f64| left + (v.max(min).log10() - lmin) / (lmax - lmin) * (w - left - 20.0);
    let y = |q: f64| (h - bottom) - q * (h - bottom - 20.0);
    let mut svg = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
    let mut d = lmin;
    while d <= lmax {
        let xv = x(10f64.powf(d));
        svg.push_str(&format!("<line x1='{xv:.1}' y1='20' x2='{xv:.1}' y2='{:.1}' stroke='#ddd'/><text x='{xv:.1}' y='{:.1}' text-anchor='middle'>{} ms</text>\n", h - bottom, h - bottom + 16.0, 10f64.powf(d)));
        d += 1.0;
    }
    for q in [0.0, 0.5, 0.9, 0.99, 1.0] {
        svg.push_str(&format!("<line x1='{left}' y1='{0:.1}' x2='{1}' y2='{0:.1}' stroke='#eee'/><text x='{2}' y='{0:.1}' text-anchor='end'>{q}</text>\n", y(q), w - 20.0, left - 4.0));
    }
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e"];
    for (i, (name, values)) in series.iter().enumerate() {
        let mut v = values.clone();
        v.sort_by(f64::total_cmp);
        let n = v.len().max(1) as f64;
        let pts: Vec<String> = v
            .iter()
            .enumerate()
            .map(|(k, val)| format!("{:.1},{:.1}", x(*val), y((k + 1) as f64 / n)))
            .collect();
        let c = colors[i % colors.len()];
        svg.push_str(&format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2' points='{}'/>\n",
            pts.join(" ")
        ));
        svg.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' fill='{c}'>{name} (n={})</text>\n",
            left + 10.0,
            36.0 + 16.0 * i as f64,
            v.len()
        ));
    }
    svg.push_str(&format!("<text x='{:.1}' y='{:.1}' text-anchor='middle'>latency, log scale (fraction of changes ≤ x)</text>\n</svg>\n", w / 2.0, h - 8.0));
    svg
}

/// Log-log plot of cost against size from the `scale` rows ("<n> instances: <metric>"):
/// one line per metric in `series` (label, metric prefix), dashed when the label starts
/// with "HAProxy" (the floor our numbers are drawn beside).
pub fn scale_svg(rows: &[Row], series: &[(&str, &str)]) -> String {
    let points = |prefix: &str| -> Vec<(f64, f64)> {
        let mut p: Vec<(f64, f64)> = rows
            .iter()
            .filter(|r| r.scenario == "scale" && r.value > 0.0 && r.value.is_finite())
            .filter_map(|r| {
                let (n, metric) = r.metric.split_once(" instances: ")?;
                metric
                    .starts_with(prefix)
                    .then(|| Some((n.parse::<f64>().ok()?, r.value)))?
            })
            .collect();
        p.sort_by(|a, b| a.0.total_cmp(&b.0));
        p
    };
    let all: Vec<(f64, f64)> = series.iter().flat_map(|(_, m)| points(m)).collect();
    let (w, h, left, bottom) = (720.0, 440.0, 70.0, 50.0);
    let bounds = |f: fn(&(f64, f64)) -> f64| {
        let lo = all.iter().map(f).fold(f64::INFINITY, f64::min).max(0.001);
        let hi = all.iter().map(f).fold(0.0, f64::max).max(lo * 10.0);
        (lo.log10().floor(), hi.log10().ceil())
    };
    let (xmin, xmax) = bounds(|p| p.0);
    let (ymin, ymax) = bounds(|p| p.1);
    let x = |v: f64| left + (v.log10() - xmin) / (xmax - xmin) * (w - left - 180.0);
    let y = |v: f64| (h - bottom) - (v.log10() - ymin) / (ymax - ymin) * (h - bottom - 20.0);
    let mut svg = format!("<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' font-family='sans-serif' font-size='12'>\n<rect width='100%' height='100%' fill='white'/>\n");
    let mut d = xmin;
    while d <= xmax {
        let xv = x(10f64.powf(d));
        svg.push_str(&format!("<line x1='{xv:.1}' y1='20' x2='{xv:.1}' y2='{:.1}' stroke='#ddd'/><text x='{xv:.1}' y='{:.1}' text-anchor='middle'>{}</text>\n", h - bottom, h - bottom + 16.0, 10f64.powf(d)));
        d += 1.0;
    }
    let mut d = ymin;
    while d <= ymax {
        let yv = y(10f64.powf(d));
        svg.push_str(&format!("<line x1='{left}' y1='{yv:.1}' x2='{:.1}' y2='{yv:.1}' stroke='#eee'/><text x='{:.1}' y='{yv:.1}' text-anchor='end'>{} ms</text>\n", w - 180.0, left - 4.0, 10f64.powf(d)));
        d += 1.0;
    }
    let colors = [
        "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#555555",
    ];
    for (i, (label, prefix)) in series.iter().enumerate() {
        let p = points(prefix);
        if p.is_empty() {
            continue;
        }
        let c = colors[i % colors.len()];
        let dash = if label.starts_with("HAProxy") {
            " stroke-dasharray='6 4'"
        } else {
            ""
        };
        let pts: Vec<String> = p
            .iter()
            .map(|(n, v)| format!("{:.1},{:.1}", x(*n), y(*v)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill='none' stroke='{c}' stroke-width='2'{dash} points='{}'/>\n",
            pts.join(" ")
        ));
        for (n, v) in &p {
            svg.push_str(&format!(
                "<circle cx='{:.1}' cy='{:.1}' r='3' fill='{c}'/>\n",
                x(*n),
                y(*v)
            ));
        }
        svg.push_str(&format!(
            "<text x='{:.1}' y='{:.1}' fill='{c}'>{label}</text>\n",
            w - 170.0,
            30.0 + 18.0 * i as f64
        ));
    }
    svg.push_str(&format!("<text x='{:.1}' y='{:.1}' text-anchor='middle'>servers in one backend (log scale); cost, log scale</text>\n</svg>\n", (w - 180.0) / 2.0 + left / 2.0, h - 8.0));
    svg
}
