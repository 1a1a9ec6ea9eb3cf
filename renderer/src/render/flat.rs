//! What of the root may a template read? Two questions the template data's size depends on:
//!
//! - [`may_read_instances`]: the root's flat `instances` list. The template data holds every
//!   instance twice — in `services.<name>` and in `instances` — and at 100 000 instances the
//!   second copy alone is ~200 MiB of JSON objects. Most templates (the shipped one, the
//!   examples) never read it; the renderer builds it only for templates that may.
//! - [`services_only_by_root_loops`]: whether `services` is read only as the list of a
//!   top-level `{{#each services}}` whose body the each-cache can cache (or through the
//!   `instances` helper). Then the services nobody is rendering can be kept frozen — as
//!   JSON text, ~10× smaller than the objects — and thawed for the one item that renders
//!   again ([`crate::data`]).
//!
//! Conservative: "may read" `NAME` is any of
//! - a path naming `NAME` outside a helper call's name (`{{#each instances}}`,
//!   `@root.instances`, `../instances`), or a string literal `"NAME"` (`lookup`);
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
    Walk {
        name: "instances",
        root_loop: None,
    }
    .template(tree, 0)
}

/// True when `tree` reads the root's `services` only as the list of top-level
/// `{{#each services}}` blocks (without block parameters) whose bodies `cacheable`
/// accepts — and through the `instances` helper, which is no path.
pub(crate) fn services_only_by_root_loops(
    tree: &Template,
    cacheable: &dyn Fn(&Template) -> bool,
) -> bool {
    !Walk {
        name: "services",
        root_loop: Some(cacheable),
    }
    .template(tree, 0)
}

/// One question: may a template read the root's `name`?
struct Walk<'a> {
    name: &'a str,
    /// When set, `{{#each NAME}}` at the top whose body this accepts is no read (its
    /// items are, and the body is walked as usual).
    root_loop: Option<&'a dyn Fn(&Template) -> bool>,
}

impl Walk<'_> {
    fn template(&self, t: &Template, depth: usize) -> bool {
        t.elements.iter().any(|e| self.element(e, depth))
    }

    fn element(&self, e: &TemplateElement, depth: usize) -> bool {
        match e {
            TemplateElement::RawString(_) | TemplateElement::Comment(_) => false,
            TemplateElement::Expression(h) | TemplateElement::HtmlExpression(h) => {
                self.helper(h, depth, false)
            }
            TemplateElement::HelperBlock(h) => self.helper(h, depth, true),
            // Partials and decorators: whatever they include sees the context they are given.
            _ => true,
        }
    }

    /// `{{#each NAME}}…{{/each}}` at the top, with a body `root_loop` accepts.
    fn is_root_loop(&self, h: &HelperTemplate, name: Option<&str>, depth: usize) -> bool {
        let Some(accepts) = self.root_loop else {
            return false;
        };
        let each = name == Some("each");
        let list = match h.params.as_slice() {
            [Parameter::Path(Path::Relative((segs, raw)))] => {
                raw == self.name && matches!(segs.as_slice(), [PathSeg::Named(n)] if n == self.name)
            }
            _ => false,
        };
        depth == 0
            && each
            && list
            && h.hash.is_empty()
            && h.block_param.is_none()
            && h.template.as_ref().is_some_and(accepts)
    }

    fn helper(&self, h: &HelperTemplate, depth: usize, block: bool) -> bool {
        let name = match &h.name {
            Parameter::Name(n) => Some(n.as_str()),
            Parameter::Path(Path::Relative((_, raw))) => Some(raw.as_str()),
            _ => None,
        };
        if block && self.is_root_loop(h, name, depth) {
            // The items are read in the body, one level down; `{{else}}` at the top.
            return h.template.iter().any(|t| self.template(t, 1))
                || h.inverse.iter().any(|t| self.template(t, 0));
        }
        // The name of a call (with parameters, or a block) is a helper, not data; a bare
        // `{{name}}` is data unless a helper has that name, and the renderer registers
        // `instances` as one, so `{{instances}}` is the helper too.
        let name_is_data =
            !block && h.params.is_empty() && h.hash.is_empty() && name != Some("instances");
        if name_is_data && self.parameter(&h.name, depth) {
            return true;
        }
        if h.params
            .iter()
            .chain(h.hash.values())
            .any(|p| self.parameter(p, depth))
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
            .any(|t| self.template(t, inner))
    }

    fn parameter(&self, p: &Parameter, depth: usize) -> bool {
        let own = self.name;
        match p {
            Parameter::Name(n) => n == own,
            Parameter::Literal(v) => v.as_str() == Some(own),
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
                names.contains(&own)
                    || (root && names.is_empty())
                    || (!root && ups >= depth && names.is_empty())
                    || (!root && ups >= depth && depth > 0 && names.first() == Some(&own))
            }
            // `@root` alone parses as a local variable named `root`.
            Parameter::Path(Path::Local((_, name, _))) => name == "root",
            Parameter::Subexpression(sub) => match sub.as_element() {
                TemplateElement::Expression(h) => {
                    // A subexpression always calls a helper: its name is not data.
                    h.params
                        .iter()
                        .chain(h.hash.values())
                        .any(|p| self.parameter(p, depth))
                }
                _ => true,
            },
            // Anything this crate version adds: assume it may.
            _ => true,
        }
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

    fn freezes(text: &str) -> bool {
        services_only_by_root_loops(
            &Template::compile(text).unwrap(),
            &super::super::each::cacheable,
        )
    }

    #[test]
    fn templates_that_read_services_only_through_root_loops() {
        for t in [
            include_str!("../../../templates/haproxy.cfg.hbs"),
            include_str!("../../../templates/examples/tcp.cfg.hbs"),
            "{{#each services}}backend {{@key}}\n{{#each this}}server {{id}}\n{{/each}}{{/each}}",
            "{{#if vars.x}}{{#each services}}{{@key}} {{len this}}{{/each}}{{/if}}",
            "{{#each services}}{{@key}}{{else}}none {{vars.x}}{{/each}}",
            "{{#each services}}{{#each this}}{{#with meta as |m|}}{{m.zone}}{{/with}}{{/each}}{{/each}}",
            "{{#each (instances \"web\")}}{{id}}{{/each}}{{#each services}}{{@index}}{{/each}}",
        ] {
            assert!(freezes(t), "{t}");
        }
    }

    #[test]
    fn templates_that_may_read_services_otherwise() {
        for t in [
            // `@root` and `@../key` in the bodies: not cacheable
            include_str!("../../../templates/examples/multi-service.cfg.hbs"),
            "{{#each services}}{{@root.vars.x}}{{/each}}",
            "{{#each services.web}}{{id}}{{/each}}",
            "{{#each services as |list name|}}{{name}}{{/each}}",
            "{{#with vars}}{{#each services}}{{@key}}{{/each}}{{/with}}",
            "{{#each vars}}{{#each services}}{{@key}}{{/each}}{{/each}}",
            "{{len services}}",
            "{{json this}}",
            "{{#each this}}{{@key}}{{/each}}",
            "{{lookup this \"services\"}}",
            "{{#each services}}{{#each ../services}}{{@key}}{{/each}}{{/each}}",
            "{{#each services}}{{json @root}}{{/each}}",
            "{{#each services}}{{@key}}{{else}}{{json this}}{{/each}}",
            "{{#each @root.services}}{{@key}}{{/each}}",
            "{{#each services}}{{@key}}{{/each}}{{> part}}",
        ] {
            assert!(!freezes(t), "{t}");
        }
    }
}
