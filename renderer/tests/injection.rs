//! Config injection: no registry value can add a line, a directive or a comment to
//! haproxy.cfg. Arbitrary records (built from an alphabet rich in config syntax: newlines,
//! `#`, quotes, spaces, braces, `$`, backslashes) are either rejected by the model or
//! rendered into exactly one well-formed `server` line — and the rendered config passes
//! `haproxy -c`.

#![allow(clippy::unwrap_used)] // test code: a panic is a test failure

use std::collections::BTreeMap;

use proptest::prelude::*;
use renderer::model::Model;
use renderer::render::Renderer;

fn template() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../templates/haproxy.cfg.hbs"
    ))
    .unwrap()
}

fn hostile() -> impl Strategy<Value = String> {
    prop_oneof![
        20 => "[a-z0-9][a-z0-9._-]{0,11}",
        2 => "[a-zA-Z0-9 #\"'{}$\\\\\n\r\t:;=/,.-]{0,24}",
        1 => Just("1.2.3.4\n    server evil 6.6.6.6:80".to_string()),
        1 => Just("x # comment".to_string()),
        1 => Just("${HOME}".to_string()),
    ]
}

fn address() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => (1u8..=223, 0u8..=255, 0u8..=255, 1u8..=254).prop_map(|(a, b, c, d)| format!("{a}.{b}.{c}.{d}")),
        2 => hostile(),
    ]
}

fn render(model: &Model, dir: &std::path::Path) -> String {
    let mut r = Renderer::new();
    r.add("t", &template()).unwrap();
    let mut vars = BTreeMap::new();
    vars.insert("runtime_dir".to_string(), dir.display().to_string());
    vars.insert("http_port".to_string(), "18080".to_string());
    vars.insert("stats_port".to_string(), "18081".to_string());
    String::from_utf8(r.render("t", &model.template_data(&vars)).unwrap()).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, .. ProptestConfig::default() })]

    #[test]
    fn no_record_can_inject_config(
        id in hostile(),
        address in address(),
        port in prop_oneof![8 => 1u32..65_536, 1 => Just(0u32), 1 => 65_536u32..70_000],
        tag in hostile(),
        meta_key in hostile(),
        meta_value in hostile(),
        weight in prop_oneof![8 => 0u32..=256, 1 => 257u32..400],
    ) {
        let value = serde_json::json!({
            "id": id, "service": "webapp", "address": address, "port": port,
            "tags": [tag], "meta": {meta_key: meta_value}, "weight": weight,
        }).to_string();
        let dir = tempfile::tempdir().unwrap();
        let mut model = Model::new("/services");
        let base = render(&model, dir.path());
        let key = format!("/services/webapp/{id}");
        model.put(&key, value.as_bytes());
        let out = render(&model, dir.path());
        if model.is_empty() {
            prop_assert_eq!(&out, &base, "a rejected record must not change the config");
        } else {
            // Exactly one line more, and it is the server line, token by token.
            let added: Vec<&str> = out.lines().filter(|l| !base.lines().any(|b| b == *l)).collect();
            prop_assert_eq!(added.len(), 1, "one new line: {:?}", added);
            let words: Vec<&str> = added[0].split_whitespace().collect();
            let expected_weight = weight.to_string();
            let target = format!("{address}:{port}");
            let expected = ["server", id.as_str(), target.as_str(), "check", "inter", "2s", "weight", expected_weight.as_str(), "id"];
            prop_assert_eq!(&words[..9], &expected[..]);
            // Then the stable number, and (HAProxy < 3.0, IP addresses) the derived cookie.
            prop_assert!(words[9].parse::<u32>().is_ok_and(|n| n > 0), "{:?}", words);
            let rest = &words[10..];
            if address.parse::<std::net::IpAddr>().is_ok() {
                prop_assert_eq!(rest.len(), 2, "{:?}", words);
                prop_assert_eq!(rest[0], "cookie");
                prop_assert!(rest[1].len() == 16 && rest[1].bytes().all(|b| b.is_ascii_hexdigit()));
            } else {
                prop_assert!(rest.is_empty(), "{:?}", words);
            }
            prop_assert_eq!(out.lines().count(), base.lines().count() + 1);
        }
        let cfg = dir.path().join("haproxy.cfg");
        std::fs::write(&cfg, &out).unwrap();
        let check = std::process::Command::new("haproxy").arg("-c").arg("-f").arg(&cfg).output().unwrap();
        // Hostnames must resolve for haproxy -c; only IP literals are checked here.
        if model.is_empty() || address.parse::<std::net::IpAddr>().is_ok() {
            prop_assert!(check.status.success(), "haproxy -c failed: {}\n{}", String::from_utf8_lossy(&check.stderr), out);
        }
    }
}
