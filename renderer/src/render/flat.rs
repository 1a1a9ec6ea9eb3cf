//! Does a template read the root's flat `instances` list? The template data holds every
//! instance twice — in `services.<name>` and in `instances` — and at 100 000 instances the
//! second copy alone is ~200 MiB of JSON objects. Most templates (the shipped one, the
//! examples) never read it; the renderer builds it only for templates that may.
//!
//! Conservative: "may read it" is any of
//! - a path naming `instances` outside a helper call's name (`{{#each instances}}`,
//!   `@root.instances`, `../instances`), or a string literal `"instances"` (`lookup`);
//! - a path that reaches the root object whole: `this`/`.` outside every `each`/`with`
//!   block, `@root` alone, or as many `../` as enclosing `each`/`with` blocks (`{{json
//!   this}}` at the top prints everything);
//! - partials and decorators (where they are used decides what they see).
//!
//! Only `each` and `with` are taken to change the context; any other block is assumed to
//! keep it, which can only make the answer "yes" more often.

use handlebars::template::{HelperTemplate, Parameter, Template, TemplateElement};
use handlebars::{Path, PathSeg};

/// True when `tree` may read the root's `instances`.
pub(crate) fn may_read_instances(tree: &Template) -> bool {
    template(tree, 0)
}

fn template(t: &Template, depth: usize) -> bool {
    t.elements.iter().any(|e| element(e, depth))
}

fn element(e: &TemplateElement, depth: usize) -> bool {
    match e {
        TemplateElement::RawString(_) | TemplateElement::Comment(_) => false,
        TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
            helper(h, depth, false)
        }
        TemplateElement::HelperBlock(h) => helper(h, depth, true),
        // Partials and decorators: whatever they include sees the context they are given.
        _ => true,
    }
}

fn helper(h: &HelperTemplate, depth: usize, block: bool) -> bool {
    let name = match &h.name {
        Parameter::Name(n) => Some(n.as_str()),
        Parameter::Path(Path::Relative((_, raw))) => Some(raw.as_str()),
        _ => None,
    };
    // The name of a call (with parameters, or a block) is a helper, not data; a bare
    // `{{name}}` is data unless a helper has that name, and the renderer registers
    // `instances` as one, so `{{instances}}` is the helper too.
    let name_is_data =
        !block && h.params.is_empty() && h.hash.is_empty() && name != Some("instances");
    if name_is_data && parameter(&h.name, depth) {
        return true;
    }
    if h.params
        .iter()
        .chain(h.hash.values())
        .any(|p| parameter(p, depth))
    {
        return true;
    }
    let inner = if block && matches!(name, Some("each") | Some("with")) {
        depth + 1
    } else {
        depth
    };
    [&h.template, &h.inverse]
        .into_iter()
        .flatten()
        .any(|t| template(t, inner))
}

fn parameter(p: &Parameter, depth: usize) -> bool {
    match p {
        Parameter::Name(n) => n == "instances",
        Parameter::Literal(v) => v.as_str() == Some("instances"),
        Parameter::Path(Path::Relative((segs, raw))) => {
            // `../../x`: two levels up (`this` and `.` leave no segment at all).
            let mut ups = 0;
            let mut rest = raw.as_str();
            while let Some(r) = rest.strip_prefix("..") {
                ups += 1;
                rest = r.strip_prefix('/').unwrap_or(r);
            }
            let names: Vec<&str> = segs
                .iter()
                .filter_map(|s| match s {
                    PathSeg::Named(n) => Some(n.as_str()),
                    _ => None,
                })
                .collect();
            let root = raw.starts_with("@root");
            names.contains(&"instances")
                || (root && names.is_empty())
                || (!root && ups >= depth && names.is_empty())
                || (!root && ups >= depth && depth > 0 && names.first() == Some(&"instances"))
        }
        // `@root` alone parses as a local variable named `root`.
        Parameter::Path(Path::Local((_, name, _))) => name == "root",
        Parameter::Subexpression(sub) => match sub.as_element() {
            TemplateElement::Expression(h) => {
                // A subexpression always calls a helper: its name is not data.
                h.params
                    .iter()
                    .chain(h.hash.values())
                    .any(|p| parameter(p, depth))
            }
            _ => true,
        },
        // Anything this crate version adds: assume it may.
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(text: &str) -> bool {
        may_read_instances(&Template::compile(text).unwrap())
    }

    #[test]
    fn templates_that_do_not_read_the_flat_list() {
        for t in [
            include_str!("../../../templates/haproxy.cfg.hbs"),
            include_str!("../../../templates/examples/multi-service.cfg.hbs"),
            include_str!("../../../templates/examples/tcp.cfg.hbs"),
            "{{#each services}}backend {{@key}}\n{{#each this}}server {{id}}\n{{/each}}{{/each}}",
            "{{#each (instances \"web\")}}{{id}}{{/each}}",
            "{{#if vars.x}}{{vars.x}}{{/if}}{{#with vars}}{{this.y}}{{/with}}",
            "{{#each services as |list name|}}{{name}}{{#each list}}{{../name}}{{/each}}{{/each}}",
        ] {
            assert!(!reads(t), "{t}");
        }
    }

    #[test]
    fn templates_that_may_read_it() {
        for t in [
            "{{#each instances}}{{id}}{{/each}}",
            "{{#each services}}{{#each @root.instances}}{{id}}{{/each}}{{/each}}",
            "{{#each services}}{{#each ../instances}}{{id}}{{/each}}{{/each}}",
            "{{json this}}",
            "{{#if x}}{{json this}}{{/if}}",
            "{{#each services}}{{json @root}}{{/each}}",
            "{{#each services}}{{json ../this}}{{/each}}",
            "{{#each services}}{{#each this}}{{json ../../this}}{{/each}}{{/each}}",
            "{{#each this}}{{@key}}{{/each}}",
            "{{len instances}}",
            "{{#with (lookup @root \"instances\")}}{{len this}}{{/with}}",
            "{{> part}}",
            "{{instances.0.id}}",
        ] {
            assert!(reads(t), "{t}");
        }
    }
}
