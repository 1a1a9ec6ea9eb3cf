//! `{{#each}}` that renders an item again only when something it reads has changed.
//!
//! At 10 000 instances Handlebars costs ~2 µs per server line: 21 ms to render a config in
//! which one change altered one line. This helper replaces the built-in `each` (same
//! semantics; its loop is HAProxy-agnostic, adapted from handlebars-rust's `helper_each.rs`,
//! MIT) and keeps, per root template, the text each item rendered to, keyed by **everything
//! that text can depend on**:
//!
//! - the block (the address of its syntax tree, stable while the templates are unchanged);
//! - the item's value, encoded whole (an injective byte encoding, compared byte for byte:
//!   no hash stands in for equality);
//! - `@index`, `@first`, `@last`, `@key` — only when the block reads them, so a join in the
//!   middle of a list does not invalidate every line after it;
//! - the value of every outer block parameter the block names (`key` in
//!   `{{#with … as |key|}}{{#each …}}…{{key}}…`).
//!
//! That list is complete only for blocks whose output is a function of those inputs, which is
//! decided once per block from its syntax tree. A block is rendered the ordinary way, every
//! time, when it (or anything nested in it) reads outside the item — `../`, `@root`,
//! `@../index` — or calls a helper not known to be pure (`log`, `instances`, which reads the
//! root), and the cache is off altogether when any template uses partials or decorators
//! (they can change how text is indented or what a name means). Entries an apply did not use
//! are dropped after it, so the cache holds one config's worth of text.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use handlebars::template::{Parameter, Template, TemplateElement};
use handlebars::{
    to_json, BlockContext, BlockParamHolder, BlockParams, Context, Handlebars, Helper, HelperDef,
    HelperResult, Output, Path, PathSeg, RenderContext, RenderError, RenderErrorReason, Renderable,
};
use serde_json::Value;

/// Registered helpers whose result is not a function of their parameters alone: `log`
/// writes to the log, `instances` reads the root of the data.
const IMPURE_HELPERS: &[&str] = &["log", "instances"];

/// Helpers whose result is a function of their parameters (and block) alone. Every helper
/// [`Renderer`](super::Renderer) registers is here or in [`IMPURE_HELPERS`] (a unit test
/// checks it): a name in neither is no helper.
pub(crate) const PURE_HELPERS: &[&str] = &[
    // handlebars-rust's own
    "if",
    "unless",
    "each",
    "with",
    "lookup",
    "raw",
    "eq",
    "ne",
    "gt",
    "gte",
    "lt",
    "lte",
    "and",
    "or",
    "not",
    "len", // ours (render.rs)
    "default",
    "join",
    "json",
    "by_tag",
    "by_meta",
    "sort_by",
    "version_at_least",
    "dynamic_cookie",
    "dynamic_cookie_keyword",
    "lower",
    "upper",
    "trim",
    "concat",
    "replace",
    "split",
    "contains",
    "add",
    "sub",
    "mul",
    "div",
    "mod",
];

/// What a cacheable block reads besides its item.
#[derive(Debug, Default)]
struct Reads {
    /// First segments of relative paths: an outer block parameter, or a field of the item.
    names: Vec<String>,
    /// `@index`, `@first`, `@last`, `@key` (or the `as |item index|` parameter).
    index: bool,
    first: bool,
    last: bool,
    key: bool,
}

/// Per root template: rendered item texts by key.
#[derive(Default)]
struct Texts {
    generation: u64,
    entries: HashMap<Box<[u8]>, (String, u64)>,
}

/// Versions of the `services.<name>` values of one context, so that a loop over
/// `services` knows an unchanged service without encoding its instances: a join among
/// 100 000 instances in 1 000 services used to encode and hash every instance object to
/// find the 999 services it did not touch (~40 ms). Kept by the owner of the context
/// ([`crate::data::TemplateData`]), which patches services one by one.
#[derive(Debug)]
struct Stamps {
    /// The address of the context these describe; any other context is encoded as usual.
    ctx: usize,
    /// Changes whenever the context was built anew.
    epoch: u64,
    /// A service changed since the epoch began → its newest stamp (absent: unchanged).
    changed: HashMap<String, u64>,
}

/// The shared state of the helper and its [`Renderer`](super::Renderer).
#[derive(Default)]
pub(crate) struct Cache {
    /// False when a template uses partials or decorators.
    disabled: bool,
    /// Per block (address of its body): what it reads, `None` = not cacheable.
    blocks: HashMap<usize, Option<Arc<Reads>>>,
    templates: HashMap<String, Texts>,
    /// Items served from the cache / rendered, since the last [`Cache::take_stats`].
    hits: u64,
    misses: u64,
    stamps: Option<Stamps>,
    /// The last stamp or epoch handed out.
    counter: u64,
    /// Services the `instances` helper found frozen and thawed (see
    /// [`Renderer::take_thawed`](super::Renderer::take_thawed)).
    pub(crate) thawed: std::collections::BTreeSet<String>,
    /// The context a thawed service renders in, while it does: loops in it keep no texts.
    /// Its service's text is kept whole, and its lines' texts would be used only when that
    /// service changes next — at 100 000 instances, ~50 MiB held for one apply to spare
    /// rendering ~100 lines again.
    uncached: Option<usize>,
}

impl Cache {
    /// Forgets everything: templates were added or replaced.
    pub(crate) fn reset(&mut self, disabled: bool) {
        *self = Cache {
            disabled,
            ..Cache::default()
        };
    }

    /// The context at `ctx` was built anew: every `services.<name>` it holds is new.
    pub(crate) fn services_rebuilt(&mut self, ctx: usize) {
        self.counter += 1;
        self.stamps = Some(Stamps {
            ctx,
            epoch: self.counter,
            changed: HashMap::new(),
        });
    }

    /// These `services.<name>` values of the context at `ctx` were changed in place.
    pub(crate) fn services_changed<'a>(
        &mut self,
        ctx: usize,
        names: impl Iterator<Item = &'a str>,
    ) {
        match &mut self.stamps {
            Some(st) if st.ctx == ctx => {
                for name in names {
                    self.counter += 1;
                    st.changed.insert(name.to_string(), self.counter);
                }
            }
            // A context nobody stamped from its start: encode its items as usual.
            _ => self.stamps = None,
        }
    }

    /// The epoch, when a loop over `path` of the context at `ctx` may use stamps.
    fn stamped_epoch(&self, ctx: usize, path: Option<&Vec<String>>) -> Option<u64> {
        let st = self.stamps.as_ref().filter(|st| st.ctx == ctx)?;
        path.is_some_and(|p| p.len() == 1 && p[0] == "services")
            .then_some(st.epoch)
    }

    /// The stamp of service `name` in the current epoch (0: unchanged since it began).
    fn stamp(&self, name: &str) -> u64 {
        self.stamps
            .as_ref()
            .and_then(|st| st.changed.get(name).copied())
            .unwrap_or(0)
    }

    /// Keeps `text`, just rendered in `template`, under `key`.
    fn keep(&mut self, template: &str, key: &[u8], text: String) {
        if let Some(texts) = self.templates.get_mut(template) {
            let generation = texts.generation;
            texts.entries.insert(key.into(), (text, generation));
        }
    }

    /// Ends one render of `template`: drops the texts it did not use.
    pub(crate) fn finish(&mut self, template: &str) {
        if let Some(t) = self.templates.get_mut(template) {
            let generation = t.generation;
            t.entries.retain(|_, (_, g)| *g == generation);
            t.generation += 1;
        }
    }

    /// (hits, misses) since the last call.
    pub(crate) fn take_stats(&mut self) -> (u64, u64) {
        let stats = (self.hits, self.misses);
        (self.hits, self.misses) = (0, 0);
        stats
    }
}

pub(crate) struct CachedEach(pub(crate) Arc<Mutex<Cache>>);

/// One item's text (handlebars' `StringOutput` starts every buffer at 8 KiB).
#[derive(Default)]
struct Text(String);

impl Output for Text {
    fn write(&mut self, seg: &str) -> Result<(), std::io::Error> {
        self.0.push_str(seg);
        Ok(())
    }
}

pub(crate) fn lock(cache: &Mutex<Cache>) -> MutexGuard<'_, Cache> {
    // A panic while rendering leaves nothing half-written in the map (entries are inserted
    // whole), so a poisoned lock is still a sound cache.
    cache.lock().unwrap_or_else(|e| e.into_inner())
}

/// True when a template uses something that turns the cache off (partials, decorators).
pub(crate) fn needs_plain_each(tree: &Template) -> bool {
    tree.elements.iter().any(|e| match e {
        TemplateElement::DecoratorExpression(_)
        | TemplateElement::DecoratorBlock(_)
        | TemplateElement::PartialExpression(_)
        | TemplateElement::PartialBlock(_) => true,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => [&h.template, &h.inverse]
            .into_iter()
            .flatten()
            .any(needs_plain_each),
        _ => false,
    })
}

/// True when the cache can keep `body`'s text per item (see [`analyse`]).
pub(crate) fn cacheable(body: &Template) -> bool {
    analyse(body).is_some()
}

/// What `body` reads besides its item, or `None` when its output may depend on more.
fn analyse(body: &Template) -> Option<Reads> {
    let mut reads = Reads::default();
    template_reads(body, &mut reads).then_some(reads)
}

fn template_reads(t: &Template, reads: &mut Reads) -> bool {
    t.elements.iter().all(|e| match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => true,
        TemplateElement::Expression(h)
        | TemplateElement::HtmlExpression(h)
        | TemplateElement::HelperBlock(h) => {
            let name_ok = match &h.name {
                // An identifier: a helper, or (not one) nothing at all.
                Parameter::Name(n) => !IMPURE_HELPERS.contains(&n.as_str()),
                // A path that names a helper calls it.
                Parameter::Path(Path::Relative((_, raw))) if is_helper(raw) => {
                    PURE_HELPERS.contains(&raw.as_str())
                }
                other => parameter_reads(other, reads),
            };
            name_ok
                && h.params
                    .iter()
                    .chain(h.hash.values())
                    .all(|p| parameter_reads(p, reads))
                && [&h.template, &h.inverse]
                    .into_iter()
                    .flatten()
                    .all(|t| template_reads(t, reads))
        }
        _ => false,
    })
}

fn is_helper(name: &str) -> bool {
    PURE_HELPERS.contains(&name) || IMPURE_HELPERS.contains(&name)
}

fn parameter_reads(p: &Parameter, reads: &mut Reads) -> bool {
    match p {
        Parameter::Literal(_) | Parameter::Name(_) => true,
        Parameter::Path(Path::Local((0, name, _))) => {
            match name.as_str() {
                "index" => reads.index = true,
                "first" => reads.first = true,
                "last" => reads.last = true,
                "key" => reads.key = true,
                // Set by nested blocks only: derived from the item.
                _ => {}
            }
            true
        }
        // `@../index`: an outer block's variable.
        Parameter::Path(Path::Local(_)) => false,
        Parameter::Path(Path::Relative((segs, _))) => match segs.first() {
            // `this` / `.`: the item.
            None => true,
            Some(PathSeg::Named(n)) => {
                if !reads.names.contains(n) {
                    reads.names.push(n.clone());
                }
                // Later `../` or `@root` segments are not allowed either.
                segs.iter().all(|s| matches!(s, PathSeg::Named(_)))
            }
            // `../`, `@root`
            _ => false,
        },
        Parameter::Subexpression(sub) => match sub.as_element() {
            TemplateElement::Expression(h) => {
                let name_ok = match &h.name {
                    Parameter::Name(n) => PURE_HELPERS.contains(&n.as_str()),
                    _ => false,
                };
                name_ok
                    && h.params
                        .iter()
                        .chain(h.hash.values())
                        .all(|p| parameter_reads(p, reads))
            }
            _ => false,
        },
        _ => false,
    }
}

/// Appends an injective encoding of `v` to `out`.
fn encode(v: &Value, out: &mut Vec<u8>) {
    fn len(n: usize, out: &mut Vec<u8>) {
        out.extend_from_slice(&(n as u64).to_le_bytes());
    }
    match v {
        Value::Null => out.push(0),
        Value::Bool(b) => out.push(1 + u8::from(*b)),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                out.push(3);
                out.extend_from_slice(&u.to_le_bytes());
            } else if let Some(i) = n.as_i64() {
                out.push(4);
                out.extend_from_slice(&i.to_le_bytes());
            } else {
                out.push(5);
                out.extend_from_slice(&n.as_f64().unwrap_or(f64::NAN).to_bits().to_le_bytes());
            }
        }
        Value::String(s) => {
            out.push(6);
            len(s.len(), out);
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(a) => {
            out.push(7);
            len(a.len(), out);
            for x in a {
                encode(x, out);
            }
        }
        Value::Object(m) => {
            out.push(8);
            len(m.len(), out);
            for (k, x) in m {
                len(k.len(), out);
                out.extend_from_slice(k.as_bytes());
                encode(x, out);
            }
        }
    }
}

/// Encodes the value of every name in `names` that is a block parameter of an enclosing
/// block (the innermost wins, as when Handlebars resolves it). A name that is none resolves
/// inside the item, which the key holds already.
fn encode_outer_params<'reg: 'rc, 'rc>(
    names: &[String],
    ctx: &'rc Context,
    rc: &mut RenderContext<'reg, 'rc>,
    out: &mut Vec<u8>,
) {
    let blocks = rc.replace_blocks(VecDeque::new());
    let mut by_path = Vec::new();
    for (i, name) in names.iter().enumerate() {
        match blocks.iter().find_map(|b| b.get_block_param(name)) {
            Some(BlockParamHolder::Value(v)) => {
                out.push(1);
                encode(v, out);
            }
            Some(BlockParamHolder::Path(_)) => by_path.push(i),
            None => out.push(0),
        }
    }
    rc.replace_blocks(blocks);
    for i in by_path {
        match rc.evaluate(ctx, &names[i]) {
            Ok(v) => {
                out.push(2);
                encode(v.as_json(), out);
            }
            // The body fails the same way when it reads it.
            Err(_) => out.push(3),
        }
    }
}

/// `@first`, `@last`, `@index` and (over an object) `@key` of one item.
fn set_loop_vars(
    block: &mut BlockContext<'_>,
    first: bool,
    last: bool,
    index: usize,
    key: Option<&String>,
) {
    block.set_local_var("first", to_json(first));
    block.set_local_var("last", to_json(last));
    block.set_local_var("index", to_json(index));
    if let Some(k) = key {
        block.set_local_var("key", to_json(k));
    }
}

/// Writes `text`, rendered by `t` earlier or elsewhere, and leaves `rc` as rendering it
/// would have.
fn replay<'reg: 'rc, 'rc>(
    t: &'rc Template,
    text: &str,
    rc: &mut RenderContext<'reg, 'rc>,
    out: &mut dyn Output,
) -> HelperResult {
    if !text.is_empty() {
        rc.set_current_template_name(t.name.as_ref());
        out.write(text)?;
        rc.set_content_produced(true);
        let newline = text.ends_with('\n');
        rc.set_trailing_newline(newline);
        rc.set_indent_before_write(newline);
    }
    Ok(())
}

impl HelperDef for CachedEach {
    fn call<'reg: 'rc, 'rc>(
        &self,
        h: &Helper<'rc>,
        r: &'reg Handlebars<'reg>,
        ctx: &'rc Context,
        rc: &mut RenderContext<'reg, 'rc>,
        out: &mut dyn Output,
    ) -> HelperResult {
        let value = h
            .param(0)
            .ok_or(RenderErrorReason::ParamNotFoundForIndex("each", 0))?;
        let Some(t) = h.template() else {
            return Ok(());
        };
        let items: Vec<(Option<&String>, &Value)> = match value.value() {
            Value::Array(list) if !list.is_empty() || h.inverse().is_none() => {
                list.iter().map(|v| (None, v)).collect()
            }
            Value::Object(map) if !map.is_empty() || h.inverse().is_none() => {
                map.iter().map(|(k, v)| (Some(k), v)).collect()
            }
            _ => {
                return if let Some(else_template) = h.inverse() {
                    else_template.render(r, ctx, rc, out)
                } else if r.strict_mode() {
                    Err(RenderError::strict_error(value.relative_path()))
                } else {
                    Ok(())
                };
            }
        };

        // What the body reads, decided once per block; and the part of every item's key
        // that is the same for the whole loop.
        let block_id = t as *const Template as usize;
        let template_name = rc.get_root_template_name().cloned().unwrap_or_default();
        // `{{#each services}}` over the stamped context: an item's version stands in for
        // its encoding (epoch, and the service's stamp: 0 = unchanged since the epoch).
        let ctx_id = ctx as *const Context as usize;
        let (reads, epoch) = {
            let mut c = lock(&self.0);
            if c.disabled || c.uncached == Some(ctx_id) {
                (None, None)
            } else {
                c.templates.entry(template_name.clone()).or_default();
                let reads = c
                    .blocks
                    .entry(block_id)
                    .or_insert_with(|| analyse(t).map(Arc::new))
                    .clone();
                let epoch = c.stamped_epoch(ctx_id, value.context_path());
                (reads, epoch)
            }
        };
        let mut prefix = Vec::with_capacity(64);
        prefix.extend_from_slice(&block_id.to_le_bytes());
        if let Some(reads) = &reads {
            encode_outer_params(&reads.names, ctx, rc, &mut prefix);
        }
        // `as |item index|`: the second parameter is the index or the key.
        let (reads_index, reads_key) = match &reads {
            Some(x) => (
                x.index || h.block_param_pair().is_some(),
                x.key || h.block_param_pair().is_some(),
            ),
            None => (false, false),
        };

        let mut block = BlockContext::new();
        if let Some(p) = value.context_path() {
            block.base_path_mut().clone_from(p);
        } else {
            block.set_base_value(value.value().clone());
        }
        rc.push_block(block);
        let base_path = value.context_path();
        let base_is_services = base_path.is_some_and(|p| p.len() == 1 && p[0] == "services");
        let len = items.len();
        let mut key = prefix.clone();
        let result = (|| {
            for (i, (k, v)) in items.into_iter().enumerate() {
                let (is_first, is_last) = (i == 0, i + 1 == len);
                if let Some(reads) = &reads {
                    key.truncate(prefix.len());
                    key.push(
                        u8::from(reads.first && is_first) | u8::from(reads.last && is_last) << 1,
                    );
                    if reads_index {
                        key.extend_from_slice(&(i as u64).to_le_bytes());
                    }
                    if let (true, Some(k)) = (reads_key, k) {
                        key.extend_from_slice(&(k.len() as u64).to_le_bytes());
                        key.extend_from_slice(k.as_bytes());
                    }
                    let mut c = lock(&self.0);
                    let c = &mut *c;
                    match (epoch, k) {
                        (Some(epoch), Some(name)) => {
                            key.push(b'S');
                            key.extend_from_slice(&epoch.to_le_bytes());
                            key.extend_from_slice(&c.stamp(name).to_le_bytes());
                            key.extend_from_slice(&(name.len() as u64).to_le_bytes());
                            key.extend_from_slice(name.as_bytes());
                        }
                        _ => {
                            key.push(b'V');
                            encode(v, &mut key);
                        }
                    }
                    let mut served = false;
                    if let Some(texts) = c.templates.get_mut(&template_name) {
                        let generation = texts.generation;
                        if let Some((text, g)) = texts.entries.get_mut(&key[..]) {
                            *g = generation;
                            served = true;
                            replay(t, text, rc, out)?;
                        }
                    }
                    if served {
                        c.hits += 1;
                        continue;
                    }
                    c.misses += 1;
                }

                // A frozen service (see `freeze_service`): its body renders in a context of
                // its own holding the thawed list (a cacheable body reads nothing else).
                if let (true, Value::String(frozen)) = (base_is_services, v) {
                    let name = k.map_or("", String::as_str);
                    let item = Context::from(super::thaw_for_render(name, frozen)?);
                    let mut own = RenderContext::new(rc.get_root_template_name());
                    let mut block = BlockContext::new();
                    set_loop_vars(&mut block, is_first, is_last, i, k);
                    own.push_block(block);
                    let mut text = Text::default();
                    let outer = lock(&self.0)
                        .uncached
                        .replace(&item as *const Context as usize);
                    let rendered = t.render(r, &item, &mut own, &mut text);
                    lock(&self.0).uncached = outer;
                    rendered?;
                    replay(t, &text.0, rc, out)?;
                    if reads.is_some() {
                        lock(&self.0).keep(&template_name, &key, text.0);
                    }
                    continue;
                }

                if let Some(block) = rc.block_mut() {
                    set_loop_vars(block, is_first, is_last, i, k);
                    let index_or_key = k.map_or_else(|| to_json(i), to_json);
                    let segment = k.cloned().unwrap_or_else(|| i.to_string());
                    match base_path {
                        Some(p) => {
                            let mut path = p.clone();
                            path.push(segment);
                            *block.base_path_mut() = path;
                        }
                        None => block.set_base_value(v.clone()),
                    }
                    if let Some(name) = h.block_param() {
                        let mut params = BlockParams::new();
                        match base_path {
                            Some(_) => params.add_path(name, Vec::new())?,
                            None => params.add_value(name, v.clone())?,
                        }
                        block.set_block_params(params);
                    } else if let Some((name, index)) = h.block_param_pair() {
                        let mut params = BlockParams::new();
                        match base_path {
                            Some(_) => params.add_path(name, Vec::new())?,
                            None => params.add_value(name, v.clone())?,
                        }
                        params.add_value(index, index_or_key)?;
                        block.set_block_params(params);
                    }
                }
                if reads.is_some() {
                    let mut text = Text::default();
                    t.render(r, ctx, rc, &mut text)?;
                    out.write(&text.0)?;
                    lock(&self.0).keep(&template_name, &key, text.0);
                } else {
                    t.render(r, ctx, rc, out)?;
                }
            }
            Ok(())
        })();
        rc.pop_block();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::super::Renderer;
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// The shipped template and templates that exercise every way a body can read
    /// something: item fields, local variables, outer block parameters (values and
    /// paths), `../`, `@root`, `@../index`, derived lists, nested loops, objects.
    const TEMPLATES: &[&str] = &[
        include_str!("../../../templates/haproxy.cfg.hbs"),
        "{{#each services}}backend {{@key}}\n{{#each this}}{{@index}} {{id}}{{#if @first}} F{{/if}}{{#if @last}} L{{/if}}\n{{/each}}{{/each}}",
        "{{#each services as |svc name|}}{{#each svc as |i n|}}{{name}}/{{n}}:{{i.id}} {{/each}}{{/each}}",
        "{{#each services.web}}{{../vars.port}} {{id}};{{/each}}",
        "{{#with vars.port as |p|}}{{#each services.web}}{{p}}{{id}};{{/each}}{{/with}}",
        "{{#each (sort_by (instances \"web\") \"port\")}}{{id}}:{{port}};{{/each}}",
        "{{#each services.web}}{{#each tags}}{{this}}{{@../index}},{{/each}};{{/each}}",
        "{{#each services.web}}{{lookup meta \"zone\"}}{{@root.vars.port}}{{json this}};{{/each}}",
        "{{#each services}}{{#each this}}{{#with meta as |m|}}{{m.zone}}{{/with}}{{port}}\n{{/each}}{{/each}}",
        "{{#each services}}{{@key}}={{len this}}{{else}}none{{/each}}|{{#each services.web}}{{weight}}{{/each}}",
    ];

    fn instance(id: u8, port: u16, zone: u8) -> Value {
        json!({"id": format!("i{id}"), "address": "10.0.0.1", "port": port, "weight": 100,
               "server_id": u32::from(id) + 1, "state": (["ready", "drain", "maint"][usize::from(id % 3)]), "tags": [format!("t{zone}")],
               "meta": {"zone": format!("z{zone}")}})
    }

    /// Steps: (service, instance, port, zone, put?) and sometimes a new `vars.port`.
    fn data_after(
        state: &mut std::collections::BTreeMap<(u8, u8), (u16, u8)>,
        step: (u8, u8, u16, u8, bool),
    ) -> Value {
        let (svc, id, port, zone, put) = step;
        if put {
            state.insert((svc, id), (port, zone));
        } else {
            state.remove(&(svc, id));
        }
        let mut services = serde_json::Map::new();
        for (&(svc, id), &(port, zone)) in state.iter() {
            let name = if svc == 0 {
                "web".to_string()
            } else {
                format!("s{svc}")
            };
            services
                .entry(name)
                .or_insert_with(|| json!([]))
                .as_array_mut()
                .unwrap()
                .push(instance(id, port, zone));
        }
        json!({"services": services, "vars": {"port": format!("{}", 8000 + port % 3), "service": "web"}})
    }

    proptest! {
        /// After any sequence of changes, every template renders exactly what handlebars'
        /// own `each` renders.
        #[test]
        fn cached_renders_equal_uncached(
            steps in proptest::collection::vec((0u8..3, 0u8..8, 0u16..4, 0u8..2, any::<bool>()), 1..40),
            version in prop_oneof![Just("2.6.12"), Just("3.0.11")],
        ) {
            let mut cached = Renderer::new();
            let mut plain = Renderer::build(false);
            for (i, t) in TEMPLATES.iter().enumerate() {
                cached.add(&format!("t{i}"), t).unwrap();
                plain.add(&format!("t{i}"), t).unwrap();
            }
            cached.set_haproxy_version(version);
            plain.set_haproxy_version(version);
            let mut state = Default::default();
            for step in steps {
                let data = data_after(&mut state, step);
                for i in 0..TEMPLATES.len() {
                    let name = format!("t{i}");
                    let want = plain.render(&name, &data).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| e.to_string());
                    let got = cached.render(&name, &data).map(|b| String::from_utf8_lossy(&b).into_owned()).map_err(|e| e.to_string());
                    prop_assert_eq!(got, want, "template {}", i);
                }
            }
        }
    }

    #[test]
    fn one_change_renders_one_item_again() {
        let mut r = Renderer::new();
        r.add("t", TEMPLATES[0]).unwrap();
        r.set_haproxy_version("2.6.12");
        let mut state = Default::default();
        let mut data = Value::Null;
        for id in 0..200u8 {
            data = data_after(&mut state, (0, id, 1, 0, true));
        }
        r.render("t", &data).unwrap();
        assert_eq!(r.take_each_stats(), (0, 200), "first render: every item");
        r.render("t", &data).unwrap();
        assert_eq!(
            r.take_each_stats(),
            (200, 0),
            "nothing changed: nothing rendered"
        );
        // One port changes (the first instance's): only its line is rendered again.
        let data = data_after(&mut state, (0, 0, 2, 0, true));
        let out = String::from_utf8(r.render("t", &data).unwrap()).unwrap();
        assert_eq!(r.take_each_stats(), (199, 1));
        assert!(out.contains("server i0 10.0.0.1:2 "), "{out}");
        // The cookie key is read by every line: a new key renders them all.
        data_with_key(&mut r, &data);
        assert_eq!(r.take_each_stats(), (0, 200));
    }

    fn data_with_key(r: &mut Renderer, data: &Value) {
        let mut d = data.clone();
        d["vars"]["cookie_key"] = json!("another");
        let out = String::from_utf8(r.render("t", &d).unwrap()).unwrap();
        assert!(out.contains("dynamic-cookie-key another"));
    }

    #[test]
    fn reading_outside_the_item_or_partials_turn_the_cache_off() {
        let data = json!({"services": {"web": [instance(1, 1, 0), instance(2, 2, 0)]},
                          "vars": {"port": "80"}});
        for t in [TEMPLATES[3], TEMPLATES[6], TEMPLATES[7]] {
            let mut r = Renderer::new();
            r.add("t", t).unwrap();
            r.render("t", &data).unwrap();
            r.render("t", &data).unwrap();
            assert_eq!(r.take_each_stats().0, 0, "{t}");
        }
        let mut r = Renderer::new();
        r.add("p", "{{id}}").unwrap();
        r.add("t", "{{#each services.web}}{{> p}}{{/each}}")
            .unwrap();
        r.render("t", &data).unwrap();
        r.render("t", &data).unwrap();
        assert_eq!(r.take_each_stats(), (0, 0));
    }

    #[test]
    fn every_registered_helper_is_classified() {
        // handlebars-rust's own (registry.rs, `setup_builtins`) and ours (render.rs).
        let builtin = [
            "if", "unless", "each", "with", "lookup", "raw", "log", "eq", "ne", "gt", "gte", "lt",
            "lte", "and", "or", "not", "len",
        ];
        let source = include_str!("../render.rs");
        let ours = source
            .split("(\"")
            .skip(1)
            .filter_map(|s| s.split_once("\", Box::new(").map(|(name, _)| name));
        let mut n = 0;
        for name in builtin.into_iter().chain(ours) {
            assert!(is_helper(name), "helper {name} is neither pure nor impure");
            n += 1;
        }
        assert!(
            n >= builtin.len() + 10,
            "the list of our helpers was not found"
        );
        // …and a name that is no helper is not taken for one.
        assert!(!is_helper("id"));
    }
}
