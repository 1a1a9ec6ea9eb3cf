//! The tests' HTTP client (reqwest): one GET on a fresh connection, bounded in time.

use std::time::Duration;

/// A response: status code, headers (lower-case names), body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `NODESESSID=…` pair of the sticky-session cookie HAProxy set, if any.
    pub fn sticky_cookie(&self) -> Option<String> {
        self.headers
            .iter()
            .filter(|(n, _)| n == "set-cookie")
            .filter_map(|(_, v)| v.split(';').next())
            .find(|c| c.starts_with("NODESESSID="))
            .map(str::to_string)
    }

    /// The `id` field of the sample web app's JSON answer.
    pub fn instance_id(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(&self.body).ok()?;
        v.get("id")?.as_str().map(str::to_string)
    }
}

////// `GET path` on 127.0.0.1:port on a fresh connection (`Connection: close`, so every
/// request is balanced anew), optional cookie, at most 5 s.
pub async fn get(port: u16, path: &str, cookie: Option<&str>) -> Result<Response, String> {
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(5))
            .build()
            .unwrap_or_default()
    });
    let mut req = client
        .get(format!("http://127.0.0.1:{port}{path}"))
        .header("connection", "close");
    if let Some(c) = cookie {
        req = req.header("cookie", c);
    }
    let resp = req.send().await.map_err(|e| {
        if e.is_timeout() {
            "timeout".to_string()
        } else {
            registry::etcd::error_chain(&e)
        }
    })?;
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = resp
        .text()
        .await
        .map_err(|e| registry::etcd::error_chain(&e))?;
    Ok(Response {
        status,
        headers,
        body,
    })
}
