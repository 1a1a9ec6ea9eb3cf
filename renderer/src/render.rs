//! Rendering: a pure function of (template, data) -> bytes.
//!
//! The Handlebars registry is set up for config files, not HTML: no escaping, strict mode
//! (a typo in a template is an error, not an empty string), and the helpers users of
//! consul-template/confd expect: `eq`/`ne` (built in), `default`, `join`, `json`,
//! `instances`, `by_tag`, `by_meta`, `sort_by`, `version_at_least`.
//!
//! Strict mode, but not for services: a service that has no instances (never had, or lost
//! its last one) is absent from the registry, yet `{{#each services.webapp}}` must render
//! nothing rather than fail and leave the departed server in the config. At load time every
//! `services.<name>` path a template names is collected from its syntax tree, and at render
//! time each of those names that has no instances is given `[]`. Any other missing
//! variable (`vars.http_prot`, `servics.webapp`) stays an error.
//!
//! Besides the model's data, templates see `haproxy.version` (the HAProxy they are
//! rendered for, e.g. "3.0.11"; "" when unknown), to compare with `version_at_least`.

mod each;
mod flat;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use handlebars::template::{Parameter, Template, TemplateElement};
use handlebars::{
    handlebars_helper, Context, Handlebars, Helper, HelperDef, PathSeg, RenderContext, RenderError,
    RenderErrorReason, ScopedJson,
};
use serde_json::Value;
use thiserror::Error;

/// Template loading or rendering failure.
#[derive(Debug, Error)]
pub enum RenderFailure {
    #[error("cannot read template {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("template {path} does not compile: {message}")]
    Compile { path: String, message: String },
    #[error("rendering {name} failed: {message}")]
    Render { name: String, message: String },
}

/// A set of compiled templates, each under its own name.
pub struct Renderer {
    hbs: Handlebars<'static>,
    /// Every `services.<name>` the templates name: rendered as `[]` while it has no instances.
    named_services: BTreeSet<String>,
    /// What templates see as `haproxy`.
    haproxy: Value,
    /// The texts `{{#each}}` items rendered to (see [`each`]).
    each_cache: Arc<Mutex<each::Cache>>,
    /// The length of each template's last text: the next one is written into a buffer of
    /// about that size, not one that doubles its way there (at 100 000 instances: a 6 MB
    /// config copied ~once more while growing, and kept in an 8 MiB buffer).
    sizes: Mutex<std::collections::HashMap<String, usize>>,
    /// A template uses partials or decorators: `{{#each}}` renders every item every time.
    plain_each: bool,
    /// A template may read the root's flat `instances` list (see [`flat`]).
    flat_instances: bool,
    /// A template reads `services` otherwise than through top-level cacheable
    /// `{{#each services}}` loops and the `instances` helper (see [`flat`]).
    services_read_otherwise: bool,
}

impl Default for Renderer {
    fn default() -> Self {
        Self::new()
    }
}

impl Renderer {
    /// An empty registry with the config-file settings and helpers.
    pub fn new() -> Self {
        Self::build(true)
    }

    /// `cached_each`: `{{#each}}` reuses the text of unchanged items (false: handlebars'
    /// own, the reference the cache is tested against).
    fn build(cached_each: bool) -> Self {
        let mut hbs = Handlebars::new();
        let each_cache = Arc::new(Mutex::new(each::Cache::default()));
        hbs.register_escape_fn(handlebars::no_escape);
        hbs.set_strict_mode(true);
        let ours: [(&str, Box<dyn HelperDef + Send + Sync>); 22] = [
            ("default", Box::new(DefaultHelper)),
            ("join", Box::new(join)),
            ("json", Box::new(json)),
            ("instances", Box::new(InstancesHelper(each_cache.clone()))),
            ("by_tag", Box::new(by_tag)),
            ("by_meta", Box::new(by_meta)),
            ("sort_by", Box::new(sort_by)),
            ("version_at_least", Box::new(version_at_least)),
            ("dynamic_cookie", Box::new(dynamic_cookie)),
            ("dynamic_cookie_keyword", Box::new(dynamic_cookie_keyword)),
            ("lower", Box::new(lower)),
            ("upper", Box::new(upper)),
            ("trim", Box::new(trim)),
            ("concat", Box::new(concat)),
            ("replace", Box::new(replace)),
            ("split", Box::new(split)),
            ("contains", Box::new(contains)),
            ("add", Box::new(Arith("add", i64::checked_add))),
            ("sub", Box::new(Arith("sub", i64::checked_sub))),
            ("mul", Box::new(Arith("mul", i64::checked_mul))),
            ("div", Box::new(Arith("div", i64::checked_div))),
            ("mod", Box::new(Arith("mod", i64::checked_rem))),
        ];
        for (name, helper) in ours {
            hbs.register_helper(name, helper);
        }
        if cached_each {
            hbs.register_helper("each", Box::new(each::CachedEach(each_cache.clone())));
        }
        Renderer {
            hbs,
            named_services: BTreeSet::new(),
            haproxy: serde_json::json!({"version": ""}),
            each_cache,
            sizes: Mutex::default(),
            plain_each: false,
            flat_instances: false,
            services_read_otherwise: !cached_each,
        }
    }

    /// Sets the HAProxy version templates see as `haproxy.version` ("" = unknown).
    pub fn set_haproxy_version(&mut self, version: &str) {
        self.haproxy = serde_json::json!({ "version": version });
    }

    /// `{{#each}}` items served from the cache and rendered, since the last call.
    pub fn take_each_stats(&self) -> (u64, u64) {
        self.lock_cache().take_stats()
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, each::Cache> {
        self.each_cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a loaded template may read the root's flat `instances` list: the template
    /// data holds it only then.
    pub fn reads_flat_instances(&self) -> bool {
        self.flat_instances
    }

    /// Whether the template data may keep services frozen (see [`freeze_service`]): only
    /// when every template reads `services` through top-level `{{#each services}}` loops
    /// the each-cache caches, or the `instances` helper — both thaw what they meet.
    pub fn freezes_services(&self) -> bool {
        !self.services_read_otherwise && !self.plain_each
    }

    /// The services the `instances` helper thawed since the last call: worth keeping
    /// thawed, as it will ask for them again at every render.
    pub fn take_thawed(&self) -> BTreeSet<String> {
        std::mem::take(&mut self.lock_cache().thawed)
    }

    /// The `services.<name>` names the loaded templates use.
    pub fn named_services(&self) -> &BTreeSet<String> {
        &self.named_services
    }

    /// Compiles template text under `name`.
    pub fn add(&mut self, name: &str, text: &str) -> Result<(), RenderFailure> {
        let compile_error = compile_error(name.to_string());
        let tree = Template::compile(text).map_err(&compile_error)?;
        collect_services(&tree, &mut self.named_services);
        self.flat_instances |= flat::may_read_instances(&tree);
        self.services_read_otherwise |= !flat::services_only_by_root_loops(&tree, &each::cacheable);
        self.plain_each |= each::needs_plain_each(&tree);
        self.lock_cache().reset(self.plain_each);
        self.hbs
            .register_template_string(name, text)
            .map_err(compile_error)
    }

    /// Registers `text` as the partial `{{> name}}`.
    pub fn add_partial(&mut self, name: &str, text: &str) -> Result<(), RenderFailure> {
        let compile_error = compile_error(format!("partial {name}"));
        let tree = Template::compile(text).map_err(&compile_error)?;
        collect_services(&tree, &mut self.named_services);
        self.flat_instances |= flat::may_read_instances(&tree);
        self.services_read_otherwise = true;
        self.hbs.register_partial(name, text).map_err(compile_error)
    }

    /// Registers every `NAME.hbs` in `dir` as the partial `NAME`; returns their names.
    pub fn add_partials_dir(&mut self, dir: &Path) -> Result<Vec<String>, RenderFailure> {
        let read = |source| RenderFailure::Read {
            path: dir.display().to_string(),
            source,
        };
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
            .map_err(read)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "hbs"))
            .collect();
        files.sort();
        let mut names = Vec::new();
        for path in files {
            let Some(name) = path.file_stem().and_then(|s| s.to_str()).map(String::from) else {
                continue;
            };
            let text = std::fs::read_to_string(&path).map_err(|source| RenderFailure::Read {
                path: path.display().to_string(),
                source,
            })?;
            self.add_partial(&name, &text)?;
            names.push(name);
        }
        Ok(names)
    }

    /// Reads and compiles a template file; its path is its name.
    pub fn add_file(&mut self, path: &Path) -> Result<String, RenderFailure> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| RenderFailure::Read {
            path: name.clone(),
            source,
        })?;
        self.add(&name, &text)?;
        Ok(name)
    }

    /// Renders `name` with `data` (a copy of it; see [`Renderer::context`] to render
    /// without one).
    pub fn render(&self, name: &str, data: &Value) -> Result<Vec<u8>, RenderFailure> {
        self.render_with(name, &self.context(data.clone()))
    }

    /// The rendering context for `data` (taken, not copied: at 10 000 instances a copy
    /// and its drop cost as much as the render), completed with `haproxy` and an empty
    /// list for every named service without instances. One context serves every template
    /// of an apply.
    pub fn context(&self, data: Value) -> Context {
        let mut ctx = Context::from(data);
        if let Value::Object(root) = ctx.data_mut() {
            root.insert("haproxy".into(), self.haproxy.clone());
            if !self.named_services.is_empty() {
                let services = root
                    .entry("services")
                    .or_insert_with(|| Value::Object(Default::default()));
                if let Value::Object(services) = services {
                    for name in &self.named_services {
                        services
                            .entry(name.clone())
                            .or_insert_with(|| Value::Array(Vec::new()));
                    }
                }
            }
        }
        ctx
    }

    /// Renders `name` in `ctx` (from [`Renderer::context`]).
    /// `ctx` was built anew (see [`each`]'s stamps): its services are all new to the cache.
    pub(crate) fn services_rebuilt(&self, ctx: &Context) {
        self.lock_cache()
            .services_rebuilt(ctx as *const Context as usize);
    }

    /// These services of `ctx` were patched in place since it was built or last stamped.
    pub(crate) fn services_changed<'a>(&self, ctx: &Context, names: impl Iterator<Item = &'a str>) {
        self.lock_cache()
            .services_changed(ctx as *const Context as usize, names);
    }

    pub fn render_with(&self, name: &str, ctx: &Context) -> Result<Vec<u8>, RenderFailure> {
        let sizes = || self.sizes.lock().unwrap_or_else(|e| e.into_inner());
        let last = sizes().get(name).copied().unwrap_or(0);
        let mut text = Vec::with_capacity(last + last / 64 + 4096);
        let rendered = self.hbs.render_with_context_to_write(name, ctx, &mut text);
        self.lock_cache().finish(name);
        rendered.map_err(|e: RenderError| RenderFailure::Render {
            name: name.to_string(),
            message: e.to_string(),
        })?;
        // Handlebars writes `&str`s only: the bytes are UTF-8, as the string they were.
        sizes().insert(name.to_string(), text.len());
        Ok(text)
    }
}

/// A compile error of the template or partial `path` as one line (a journal shows each
/// line as an entry of its own): where, then why.
fn compile_error(path: String) -> impl Fn(handlebars::TemplateError) -> RenderFailure {
    move |e| RenderFailure::Compile {
        path: path.clone(),
        message: match e.pos() {
            Some((line, column)) => format!("line {line}, column {column}: {}", e.reason()),
            None => e.reason().to_string(),
        },
    }
}

/// Adds to `out` the `<name>` of every `services.<name>` path in `tree` (also under
/// `@root.`/`../`, in helper parameters, hash values, sub-expressions and nested blocks).
fn collect_services(tree: &Template, out: &mut BTreeSet<String>) {
    for element in &tree.elements {
        collect_element(element, out);
    }
}

fn collect_element(element: &TemplateElement, out: &mut BTreeSet<String>) {
    match element {
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            let params = std::iter::once(&h.name)
                .chain(&h.params)
                .chain(h.hash.values());
            for p in params {
                collect_parameter(p, out);
            }
            for t in [&h.template, &h.inverse].into_iter().flatten() {
                collect_services(t, out);
            }
        }
        TemplateElement::DecoratorExpression(d)
        | TemplateElement::DecoratorBlock(d)
        | TemplateElement::PartialExpression(d)
        | TemplateElement::PartialBlock(d) => {
            for p in d.params.iter().chain(d.hash.values()) {
                collect_parameter(p, out);
            }
            if let Some(t) = &d.template {
                collect_services(t, out);
            }
        }
        _ => {}
    }
}

fn collect_parameter(p: &Parameter, out: &mut BTreeSet<String>) {
    match p {
        Parameter::Path(handlebars::Path::Relative((segs, _))) => {
            let mut names = segs.iter().filter_map(|s| match s {
                PathSeg::Named(n) => Some(n.as_str()),
                _ => None,
            });
            if let (Some("services"), Some(name)) = (names.next(), names.next()) {
                out.insert(name.to_string());
            }
        }
        Parameter::Subexpression(sub) => collect_element(&sub.element, out),
        _ => {}
    }
}

/// Numeric components of a version ("3.0.11-1+deb13u4" → [3, 0, 11]); stops at the first
/// part that is not a number.
fn version_parts(v: &str) -> Vec<u64> {
    v.split(['.', '-', '+'])
        .map_while(|p| p.parse().ok())
        .collect()
}

handlebars_helper!(version_at_least: |version: str, minimum: str| {
    let (have, want) = (version_parts(version), version_parts(minimum));
    // An unknown version is the oldest: templates fall back to what every version accepts.
    !have.is_empty() && have >= want
});

// `{{dynamic_cookie key address port}}`: the cookie HAProxy derives itself for this server
// with `cookie … dynamic` and `dynamic-cookie-key key` ("" for a hostname). Written into
// the config as `cookie <value>`, it spares HAProxy 2.6's quadratic duplicate-cookie check
// at load, and servers added at runtime (where 2.6 refuses `cookie`) derive the same value.
handlebars_helper!(dynamic_cookie: |key: str, address: str, port: u64| {
    u16::try_from(port)
        .ok()
        .and_then(|p| crate::haproxy::dynamic_cookie(key, address, p))
        .unwrap_or_default()
});

// `{{dynamic_cookie_keyword key address port}}`: ` cookie <value>` (with the leading space)
// for an IP address, "" for a hostname: one helper call per server line where
// `{{#with (dynamic_cookie …)}}` costs three (10 000 lines: ~4 ms less per render).
handlebars_helper!(dynamic_cookie_keyword: |key: str, address: str, port: u64| {
    u16::try_from(port)
        .ok()
        .and_then(|p| crate::haproxy::dynamic_cookie(key, address, p))
        .map(|c| format!(" cookie {c}"))
        .unwrap_or_default()
});

/// `{{default value fallback}}`: `fallback` when `value` is missing, null or "".
struct DefaultHelper;

impl HelperDef for DefaultHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let fallback = h
            .param(1)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("default", 1))?;
        let value = h
            .param(0)
            .filter(|p| !p.is_value_missing())
            .map(|p| p.value())
            .filter(|v| !v.is_null() && v.as_str() != Some(""));
        Ok(ScopedJson::Derived(
            value.unwrap_or_else(|| fallback.value()).clone(),
        ))
    }
}

/// `{{#each (instances "webapp")}}`: the instances of a service, `[]` when it has none
/// (so templates can name a service before its first instance registers, in strict mode).
struct InstancesHelper(Arc<Mutex<each::Cache>>);

/// A service's instance list kept as its JSON text: what the template data holds for a
/// service nobody renders anew (~200 bytes an instance where the objects take ~2 KiB).
/// `services.<name>` is otherwise always an array, so a string there is one of these.
pub fn freeze_service(list: &[Value]) -> Value {
    let mut text = serde_json::to_string(list).unwrap_or_else(|_| "[]".into());
    // Kept for long: not with up to twice its length in spare capacity.
    text.shrink_to_fit();
    Value::String(text)
}

/// The list [`freeze_service`] froze.
pub fn thaw_service(text: &str) -> Result<Value, serde_json::Error> {
    serde_json::from_str(text)
}

/// [`thaw_service`] while rendering service `name`.
fn thaw_for_render(name: &str, text: &str) -> Result<Value, RenderError> {
    thaw_service(text).map_err(|e| {
        RenderErrorReason::Other(format!("the frozen instance list of service {name}: {e}")).into()
    })
}

impl HelperDef for InstancesHelper {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let name = h.param(0).and_then(|p| p.value().as_str()).ok_or(
            RenderErrorReason::ParamTypeMismatchForName(
                "instances",
                "service".into(),
                "string".into(),
            ),
        )?;
        // Borrowed, not copied: at 10 000 instances a copy cost a third of the render.
        Ok(match ctx.data().get("services").and_then(|s| s.get(name)) {
            Some(Value::String(frozen)) => {
                let list = thaw_for_render(name, frozen)?;
                each::lock(&self.0).thawed.insert(name.to_string());
                ScopedJson::Derived(list)
            }
            Some(list) => ScopedJson::Context(list, vec!["services".into(), name.to_string()]),
            None => ScopedJson::Derived(Value::Array(Vec::new())),
        })
    }
}

fn as_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

handlebars_helper!(join: |list: Json, sep: str| {
    list.as_array()
        .map(|items| items.iter().map(as_text).collect::<Vec<_>>().join(sep))
        .unwrap_or_default()
});

handlebars_helper!(json: |v: Json| serde_json::to_string(v).unwrap_or_default());

// Strings. Their output is made of the value and the template's own literals: a registry
// value is validated before a template sees it, so none of these can put a character into
// the config that neither had (and `haproxy -c` checks every line).
handlebars_helper!(lower: |s: str| s.to_lowercase());
handlebars_helper!(upper: |s: str| s.to_uppercase());
handlebars_helper!(trim: |s: str| s.trim());
// Strings and numbers side by side: `{{concat name "." vars.domain}}`.
handlebars_helper!(concat: |*args| {
    args.iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect::<String>()
});
handlebars_helper!(replace: |s: str, from: str, to: str| s.replace(from, to));
handlebars_helper!(split: |s: str, sep: str| {
    s.split(sep).map(|p| Value::from(p.to_string())).collect::<Vec<_>>()
});
// A string containing a substring, or a list containing an element.
handlebars_helper!(contains: |haystack: Json, needle: Json| {
    match (haystack, needle) {
        (Value::String(h), Value::String(n)) => h.contains(n.as_str()),
        (Value::Array(items), n) => items.contains(n),
        (Value::Object(map), Value::String(k)) => map.contains_key(k),
        _ => false,
    }
});

/// Integer arithmetic (`{{add port 1000}}`, `{{mod @index 2}}`): numbers or numeric
/// strings (`vars` are strings); division by zero or overflow is a render error naming
/// the helper, never a silent 0.
struct Arith(&'static str, fn(i64, i64) -> Option<i64>);

impl HelperDef for Arith {
    fn call_inner<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        _: &'reg Handlebars<'reg>,
        _: &'rc Context,
        _: &mut RenderContext<'reg, 'rc>,
    ) -> Result<ScopedJson<'rc>, RenderError> {
        let name = self.0;
        let int = |i: usize| -> Result<i64, RenderError> {
            let v = h
                .param(i)
                .ok_or(RenderErrorReason::ParamNotFoundForIndex(name, i))?
                .value();
            v.as_i64()
                .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
                .ok_or_else(|| {
                    RenderErrorReason::Other(format!("{name}: {v} is not an integer")).into()
                })
        };
        let (a, b) = (int(0)?, int(1)?);
        (self.1)(a, b)
            .map(|r| ScopedJson::Derived(Value::from(r)))
            .ok_or_else(|| {
                RenderErrorReason::Other(format!(
                    "{name} {a} {b}: no result (division by zero or overflow)"
                ))
                .into()
            })
    }
}

handlebars_helper!(by_tag: |list: Json, tag: str| {
    Value::Array(list.as_array().map(|items| items.iter().filter(|i| {
        i.get("tags").and_then(Value::as_array).is_some_and(|t| t.iter().any(|x| x.as_str() == Some(tag)))
    }).cloned().collect()).unwrap_or_default())
});

handlebars_helper!(by_meta: |list: Json, key: str, value: str| {
    Value::Array(list.as_array().map(|items| items.iter().filter(|i| {
        i.get("meta").and_then(|m| m.get(key)).and_then(Value::as_str) == Some(value)
    }).cloned().collect()).unwrap_or_default())
});

handlebars_helper!(sort_by: |list: Json, field: str| {
    let mut items = list.as_array().cloned().unwrap_or_default();
    items.sort_by(|a, b| {
        let (x, y) = (a.get(field), b.get(field));
        match (x.and_then(Value::as_f64), y.and_then(Value::as_f64)) {
            (Some(x), Some(y)) => x.total_cmp(&y),
            _ => x.map(as_text).cmp(&y.map(as_text)),
        }
    });
    Value::Array(items)
});

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn render(t: &str, data: Value) -> Result<String, RenderFailure> {
        let mut r = Renderer::new();
        r.add("t", t)?;
        r.render("t", &data).map(|b| String::from_utf8(b).unwrap())
    }

    fn data() -> Value {
        json!({
            "services": {"web": [
                {"id": "b", "address": "10.0.0.2", "port": 80, "tags": ["v2"], "meta": {"zone": "b"}, "weight": 50},
                {"id": "a", "address": "10.0.0.1", "port": 80, "tags": ["v1", "canary"], "meta": {"zone": "a"}, "weight": 100}
            ]},
            "vars": {"port": "8080", "empty": ""},
            "revision": 7
        })
    }

    #[test]
    fn no_html_escaping() {
        assert_eq!(
            render("{{vars.x}}", json!({"vars": {"x": "a&b<c>\"d'"}})).unwrap(),
            "a&b<c>\"d'"
        );
    }

    #[test]
    fn dynamic_cookie_helper() {
        let t = "{{#with (default vars.k \"k\") as |key|}}{{#each (instances \"web\")}}{{#with (dynamic_cookie key address port) as |c|}} cookie {{c}}{{else}}{{/with}};{{/each}}{{/with}}";
        let d = json!({"vars": {}, "services": {"web": [
            {"address": "127.0.0.1", "port": 3001},
            {"address": "web-1.internal", "port": 3001}
        ]}});
        assert_eq!(render(t, d.clone()).unwrap(), " cookie 6a51f14cf3d6d726;;");
        let t =
            "{{#each (instances \"web\")}}{{dynamic_cookie_keyword \"k\" address port}};{{/each}}";
        assert_eq!(render(t, d).unwrap(), " cookie 6a51f14cf3d6d726;;");
    }

    #[test]
    fn strict_mode_rejects_typos() {
        assert!(render("{{vars.prot}}", data()).is_err());
        assert!(render("{{#each servics.web}}x{{/each}}", data()).is_err());
    }

    #[test]
    fn partials_render_and_name_their_services() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("server.hbs"),
            "server {{id}} {{address}}:{{port}}\n",
        )
        .unwrap();
        std::fs::write(
            dir.path().join("api.hbs"),
            "{{#each services.api}}x{{/each}}",
        )
        .unwrap();
        std::fs::write(dir.path().join("notes.txt"), "{{not a partial").unwrap();
        let mut r = Renderer::new();
        assert_eq!(r.add_partials_dir(dir.path()).unwrap(), ["api", "server"]);
        assert!(r.named_services().contains("api"));
        r.add("t", "{{#each services.web}}{{> server}}{{/each}}{{> api}}")
            .unwrap();
        let out = r.render("t", &data()).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "server b 10.0.0.2:80\nserver a 10.0.0.1:80\n"
        );
        // A broken partial names its file; a missing one is a render error.
        std::fs::write(dir.path().join("bad.hbs"), "{{#if}}").unwrap();
        let e = Renderer::new().add_partials_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("partial bad"), "{e}");
        let mut r = Renderer::new();
        r.add("t", "{{> nope}}").unwrap();
        assert!(r.render("t", &data()).is_err());
    }

    #[test]
    fn string_and_arithmetic_helpers() {
        let d =
            serde_json::json!({"vars": {"port": "8080", "name": " Web-App "}, "list": ["a", "b"]});
        let r = |t: &str| render(t, d.clone());
        for (template, want) in [
            ("{{lower (trim vars.name)}}", "web-app"),
            ("{{upper vars.name}}", " WEB-APP "),
            ("{{replace (trim vars.name) \"-\" \"_\"}}", "Web_App"),
            ("{{join (split \"a,b,c\" \",\") \"|\"}}", "a|b|c"),
            ("{{concat (lower \"Web\") \".\" vars.port 1}}", "web.80801"),
            ("{{#if (contains vars.name \"App\")}}y{{else}}n{{/if}}", "y"),
            ("{{#if (contains list \"c\")}}y{{else}}n{{/if}}", "n"),
            ("{{#if (contains vars \"port\")}}y{{else}}n{{/if}}", "y"),
            ("{{add vars.port 1}}", "8081"),
            (
                "{{sub 10 3}} {{mul 6 7}} {{div 7 2}} {{mod 7 2}}",
                "7 42 3 1",
            ),
            ("{{add (mul 2 3) (sub 0 1)}}", "5"),
        ] {
            assert_eq!(r(template).unwrap(), want, "{template}");
        }
        let e = r("{{div 1 0}}").unwrap_err().to_string();
        assert!(e.contains("div 1 0: no result"), "{e}");
        let e = r("{{add vars.name 1}}").unwrap_err().to_string();
        assert!(e.contains("is not an integer"), "{e}");
        // Strict mode still catches a typo inside a helper.
        assert!(r("{{lower vars.nmae}}").is_err());
    }

    #[test]
    fn helpers() {
        let d = data();
        assert_eq!(
            render("{{default vars.nope \"80\"}}", d.clone()).unwrap(),
            "80"
        );
        assert_eq!(
            render("{{default vars.empty \"80\"}}", d.clone()).unwrap(),
            "80"
        );
        assert_eq!(
            render("{{default vars.port \"80\"}}", d.clone()).unwrap(),
            "8080"
        );
        assert_eq!(
            render("{{#each (instances \"web\")}}{{id}}{{/each}}", d.clone()).unwrap(),
            "ba"
        );
        // The list is lent from the data, not copied: paths out of the loop still resolve.
        assert_eq!(
            render(
                "{{#each (instances \"web\")}}{{id}}{{@root.vars.port}}{{../revision}},{{/each}}",
                d.clone()
            )
            .unwrap(),
            "b80807,a80807,"
        );
        assert_eq!(
            render(
                "{{#each (instances \"none\")}}x{{else}}empty{{/each}}",
                d.clone()
            )
            .unwrap(),
            "empty"
        );
        assert_eq!(
            render(
                "{{#each (sort_by (instances \"web\") \"id\")}}{{id}}{{/each}}",
                d.clone()
            )
            .unwrap(),
            "ab"
        );
        assert_eq!(
            render(
                "{{#each (sort_by (instances \"web\") \"weight\")}}{{id}}{{/each}}",
                d.clone()
            )
            .unwrap(),
            "ba"
        );
        assert_eq!(
            render(
                "{{#each (by_tag (instances \"web\") \"canary\")}}{{id}}{{/each}}",
                d.clone()
            )
            .unwrap(),
            "a"
        );
        assert_eq!(
            render(
                "{{#each (by_meta (instances \"web\") \"zone\" \"b\")}}{{id}}{{/each}}",
                d.clone()
            )
            .unwrap(),
            "b"
        );
        assert_eq!(
            render(
                "{{#each (instances \"web\")}}{{join tags \",\"}};{{/each}}",
                d.clone()
            )
            .unwrap(),
            "v2;v1,canary;"
        );
        assert_eq!(
            render("{{json vars}}", d.clone()).unwrap(),
            r#"{"empty":"","port":"8080"}"#
        );
        assert_eq!(
            render(
                "{{#if (eq vars.port \"8080\")}}y{{else}}n{{/if}}",
                d.clone()
            )
            .unwrap(),
            "y"
        );
        assert_eq!(
            render("{{#if (ne revision 7)}}y{{else}}n{{/if}}", d).unwrap(),
            "n"
        );
    }

    #[test]
    fn a_named_service_without_instances_renders_empty() {
        let t = "{{#each services.web}}web {{id}};{{/each}}\
                 {{#each services.api}}api {{id}};{{else}}no api{{/each}}\
                 {{#each (sort_by @root.services.[db.main] \"id\")}}db{{/each}}|{{len services.gone}}";
        // `web` has instances; `api`, `db.main` and `gone` never had any.
        assert_eq!(render(t, data()).unwrap(), "web b;web a;no api|0");
        // The last instance of `web` leaves: its lines go, nothing fails.
        let mut emptied = data();
        emptied["services"] = json!({});
        assert_eq!(render(t, emptied).unwrap(), "no api|0");
        // No `services` at all in the data (an empty registry).
        assert_eq!(
            render("{{#each services.web}}x{{/each}}.", json!({"vars": {}})).unwrap(),
            "."
        );
    }

    #[test]
    fn strictness_stays_for_everything_but_named_services() {
        let t = "{{#each services.web}}{{id}}{{/each}}{{vars.http_prot}}";
        assert!(
            render(t, data()).is_err(),
            "a misspelt variable is an error"
        );
        assert!(render("{{#each services.web}}{{idd}}{{/each}}", data()).is_err());
        assert!(render("{{no_such_helper services.web}}", data()).is_err());
    }

    #[test]
    fn collects_service_names_from_the_syntax_tree() {
        let mut r = Renderer::new();
        r.add(
            "t",
            "{{#if (eq (len ../services.a) 0)}}{{/if}}{{#each (by_tag @root.services.b \"x\")}}\
             {{/each}}{{json services.[c.d]}}{{vars.services}}{{#each services}}{{/each}}",
        )
        .unwrap();
        let names: Vec<&str> = r.named_services().iter().map(String::as_str).collect();
        assert_eq!(names, ["a", "b", "c.d"]);
    }

    #[test]
    fn haproxy_version_and_comparison() {
        let mut r = Renderer::new();
        r.add(
            "t",
            "{{haproxy.version}} {{version_at_least haproxy.version \"3.0\"}} \
             {{version_at_least haproxy.version \"2.6.12\"}}",
        )
        .unwrap();
        let out = |r: &Renderer| String::from_utf8(r.render("t", &data()).unwrap()).unwrap();
        assert_eq!(out(&r), " false false", "unknown version: the oldest");
        r.set_haproxy_version("2.6.12");
        assert_eq!(out(&r), "2.6.12 false true");
        r.set_haproxy_version("3.0.11-1+deb13u4");
        assert_eq!(out(&r), "3.0.11-1+deb13u4 true true");
        r.set_haproxy_version("3.2");
        assert_eq!(out(&r), "3.2 true true");
    }

    #[test]
    fn rendering_is_deterministic() {
        let t = "{{#each services}}{{@key}}:{{#each this}}{{id}}{{/each}}{{/each}}";
        assert_eq!(render(t, data()).unwrap(), render(t, data()).unwrap());
    }

    #[test]
    fn broken_template_is_a_compile_error() {
        assert!(matches!(
            render("{{#each x}}", json!({})),
            Err(RenderFailure::Compile { .. })
        ));
    }
}
