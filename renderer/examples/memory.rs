//! Where the renderer's memory goes at a given size, counted by the allocator (not RSS):
//! the model, the template data, one cold render with its each-cache, and a join after it.
//!
//! `cargo run --release -p renderer --example memory -- [SERVICES] [PER_SERVICE]`
//! (default 1000 × 100, the `wide` bench's shape and template).

use std::alloc::System;
use std::collections::{BTreeMap, BTreeSet};

use renderer::data::TemplateData;
use renderer::model::Model;
use renderer::render::Renderer;
use stats_alloc::{StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

/// Bytes the allocator holds for us now.
fn live() -> usize {
    let s = GLOBAL.stats();
    s.bytes_allocated - s.bytes_deallocated
}

const TEMPLATE: &str = "global\n    maxconn 4096\n{{#each services}}\nbackend be_{{@key}}\n    balance roundrobin\n{{#each this}}\n    server {{id}} {{address}}:{{port}} weight {{weight}} id {{server_id}}\n{{/each}}\n{{/each}}\n";

fn mib(b: usize) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn rss() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |k| k / 1024.0)
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (services, per) = (
        args.first().copied().unwrap_or(1000),
        args.get(1).copied().unwrap_or(100),
    );
    let mut last = live();
    let mut report = |what: &str| {
        let now = live();
        println!(
            "{what:<44} {:>+9.1} MiB   live {:>7.1}   RSS {:>7.1}",
            mib(now) - mib(last),
            mib(now),
            rss()
        );
        last = now;
    };
    report("start");
    let mut model = Model::new("/services");
    for s in 0..services {
        let service = format!("svc{s:04}");
        for i in 0..per {
            let id = format!("s{s:04}-{i:05}");
            let key = registry::instance_key("/services", &service, &id);
            let value = registry::Instance::new(&service, &id, "127.0.0.1", 8000).encode();
            model.put(&key, value.as_bytes());
        }
    }
    model.revision = 1;
    report(&format!("model ({} instances)", services * per));
    let mut renderer = Renderer::new();
    renderer.add("t", TEMPLATE).expect("template");
    model.set_flat_list(renderer.reads_flat_instances());
    let (vars, none) = (BTreeMap::new(), BTreeSet::new());
    let mut td = TemplateData::new();
    td.update(&renderer, &mut model, &vars, &none, usize::MAX);
    report(&format!(
        "template data (frozen: {})",
        renderer.freezes_services()
    ));
    let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
    let text = renderer.render_with("t", ctx).expect("render");
    report(&format!(
        "cold render ({:.1} MiB of text kept)",
        mib(text.len())
    ));
    drop(text);
    for n in 0..3 {
        let id = format!("join{n}");
        let key = registry::instance_key("/services", "svc0000", &id);
        let value = registry::Instance::new("svc0000", &id, "127.0.0.2", 8000).encode();
        model.put(&key, value.as_bytes());
        model.revision += 1;
        let ctx = td.update(&renderer, &mut model, &vars, &none, usize::MAX).0;
        let text = renderer.render_with("t", ctx).expect("render");
        drop(text);
        report(&format!("join {n} rendered (text dropped)"));
    }
}
