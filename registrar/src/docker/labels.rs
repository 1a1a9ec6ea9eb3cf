//! `registrar docker`: what a container's labels say about its registration. Pure: the
//! daemon turns the engine's view of a container into a [`Container`] and asks
//! [`instances`] for the records, which follow the registry contract exactly (the same
//! validation as the in-image registrar); a bad label is an error naming the container
//! and the label, and nothing is written for the container.
//!
//! A container registers one service with the `lb-registry.*` labels, and any number more
//! with port groups: `lb-registry.<port>.service`, `.id`, `.tags`, `.meta.<key>`,
//! `.weight` register service `service` on container port `<port>` (registrator's
//! `SERVICE_<port>_NAME`). A group takes nothing from the top-level labels but the network.

use std::collections::BTreeMap;

use registry::validate::{self, ValidationError};
use registry::Instance;
use thiserror::Error;

/// The label that opts a container in: its value is the service name.
pub const SERVICE: &str = "lb-registry.service";
/// The container port to register (optional when exactly one TCP port is exposed).
pub const PORT: &str = "lb-registry.port";
/// The instance id (default: the container's name).
pub const ID: &str = "lb-registry.id";
/// Comma-separated tags.
pub const TAGS: &str = "lb-registry.tags";
/// `lb-registry.meta.<key>=<value>`, one label per key.
pub const META_PREFIX: &str = "lb-registry.meta.";
/// Weight 0-256 (default 100).
pub const WEIGHT: &str = "lb-registry.weight";
/// Which network's address, when the container is on several.
pub const NETWORK: &str = "lb-registry.network";
/// The meta key marking records this daemon wrote (value: `docker:<owner>`), so that a
/// restarted daemon removes only its own stale keys, never an in-image registrar's.
pub const OWNER_META: &str = "registered-by";

/// Which address goes into the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressMode {
    /// The container's IP on its network and the container port (default).
    Container,
    /// This host's address (`--host-address`) and the host port Docker published for the
    /// container port (what registrator did).
    Published { host_address: String },
}

/// What the engine says about a container, as far as registration needs it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Container {
    /// The name, without Docker's leading `/`.
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Network name → the container's IP on it (empty IPs left out).
    pub networks: BTreeMap<String, String>,
    /// Exposed TCP ports.
    pub exposed: Vec<u16>,
    /// Container TCP port → host port Docker published it on.
    pub published: BTreeMap<u16, u16>,
}

/// Why a labelled container cannot be registered.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LabelError {
    #[error("container {container}: label {label}={value:?}: {why}")]
    Label {
        container: String,
        label: String,
        value: String,
        why: String,
    },
    #[error("container {container}: {why}")]
    Container { container: String, why: String },
}

/// The labels of one registration: the top level (`lb-registry.service` …) or a port group
/// (`lb-registry.<port>.service` …).
struct Group {
    /// `lb-registry.` or `lb-registry.<port>.`.
    prefix: String,
    /// The port a group is for.
    port: Option<u16>,
}

impl Group {
    fn label(&self, field: &str) -> String {
        format!("{}{field}", self.prefix)
    }
}

/// True when `labels` ask for any registration (the top level or a port group).
pub fn is_labelled(labels: &BTreeMap<String, String>) -> bool {
    labels.contains_key(SERVICE) || labels.keys().any(|k| port_group(k).is_some())
}

/// `lb-registry.<port>.service` → the port.
fn port_group(label: &str) -> Option<u16> {
    let (port, field) = group_label(label)?;
    (field == "service").then(|| port.parse().ok()).flatten()
}

/// `lb-registry.<digits>.<field>` → (digits, field): a port group's label, its port not
/// yet checked.
fn group_label(label: &str) -> Option<(&str, &str)> {
    let (head, field) = label.strip_prefix("lb-registry.")?.split_once('.')?;
    head.bytes()
        .all(|b| b.is_ascii_digit())
        .then_some((head, field))
}

/// Every record `c` asks for, in order: the top level, then port groups by port; empty
/// when it carries no registration label. `owner` is written to [`OWNER_META`] as
/// `docker:<owner>`; `network` (the daemon's `--network`) is where addresses come from.
/// Any bad label fails the whole container.
pub fn instances(
    c: &Container,
    mode: &AddressMode,
    owner: &str,
    network: Option<&str>,
) -> Result<Vec<Instance>, LabelError> {
    let mut groups = Vec::new();
    if c.labels.contains_key(SERVICE) {
        groups.push(Group {
            prefix: "lb-registry.".into(),
            port: None,
        });
    }
    let mut ports: Vec<(u16, &String)> = Vec::new();
    for label in c.labels.keys() {
        let Some((head, _)) = group_label(label) else {
            continue;
        };
        match head.parse::<u16>() {
            Ok(p) if p > 0 => {
                if !ports.iter().any(|(q, _)| *q == p) {
                    ports.push((p, label));
                }
            }
            _ => {
                return Err(LabelError::Label {
                    container: c.name.clone(),
                    label: label.clone(),
                    value: c.labels[label].clone(),
                    why: "not a port number (1-65535) in a port group label".into(),
                })
            }
        }
    }
    ports.sort_unstable();
    for (port, label) in ports {
        let prefix = format!("lb-registry.{port}.");
        if !c.labels.contains_key(&format!("{prefix}service")) {
            return Err(LabelError::Label {
                container: c.name.clone(),
                label: label.clone(),
                value: c.labels[label].clone(),
                why: format!("port group {port} has no {prefix}service label"),
            });
        }
        groups.push(Group {
            prefix,
            port: Some(port),
        });
    }
    let mut out: Vec<Instance> = Vec::new();
    for g in &groups {
        let i = group_instance(c, g, mode, owner, network)?;
        if let Some(first) = out.iter().find(|o| o.service == i.service && o.id == i.id) {
            return Err(LabelError::Container {
                container: c.name.clone(),
                why: format!(
                    "two registrations are {}/{} (ports {} and {}); set {}",
                    i.service,
                    i.id,
                    first.port,
                    i.port,
                    g.label("id")
                ),
            });
        }
        out.push(i);
    }
    Ok(out)
}

fn group_instance(
    c: &Container,
    g: &Group,
    mode: &AddressMode,
    owner: &str,
    network: Option<&str>,
) -> Result<Instance, LabelError> {
    let (service_l, id_l, tags_l, weight_l) = (
        g.label("service"),
        g.label("id"),
        g.label("tags"),
        g.label("weight"),
    );
    let meta_prefix = g.label("meta.");
    let service = &c.labels[&service_l];
    let label_err = |label: &str, why: String| LabelError::Label {
        container: c.name.clone(),
        label: label.to_string(),
        value: c.labels.get(label).cloned().unwrap_or_default(),
        why,
    };
    let container_err = |why: String| LabelError::Container {
        container: c.name.clone(),
        why,
    };
    validate::name("service", service).map_err(|e| label_err(&service_l, e.to_string()))?;
    let id = match c.labels.get(&id_l) {
        Some(id) => {
            validate::name("id", id).map_err(|e| label_err(&id_l, e.to_string()))?;
            id.clone()
        }
        None => {
            validate::name("id", &c.name).map_err(|e| {
                container_err(format!(
                    "its name cannot be an instance id ({e}); set the {id_l} label"
                ))
            })?;
            c.name.clone()
        }
    };
    let port = match (g.port, c.labels.get(PORT)) {
        (Some(p), _) => p,
        (None, Some(p)) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(label_err(PORT, "not a port number (1-65535)".into())),
        },
        (None, None) => match c.exposed.as_slice() {
            [one] => *one,
            [] => return Err(container_err(format!("exposes no TCP port; set {PORT}"))),
            many => {
                return Err(container_err(format!(
                    "exposes several TCP ports ({many:?}); set {PORT}"
                )))
            }
        },
    };
    let (address, port) = match mode {
        AddressMode::Container => {
            let chosen = match (network, c.labels.get(NETWORK)) {
                (Some(daemon), Some(label)) if daemon != label => {
                    return Err(label_err(
                        NETWORK,
                        format!(
                            "this daemon registers addresses on network {daemon} only (--network)"
                        ),
                    ))
                }
                (Some(daemon), _) => Some(daemon.to_string()),
                (None, label) => label.cloned(),
            };
            let ip = match chosen.as_ref() {
                Some(net) => c.networks.get(net).cloned().ok_or_else(|| {
                    label_err(
                        NETWORK,
                        format!(
                            "not one of its networks with an address ({})",
                            names(&c.networks)
                        ),
                    )
                })?,
                None => match c.networks.len() {
                    1 => c.networks.values().next().cloned().unwrap_or_default(),
                    0 => return Err(container_err("has no network address".into())),
                    _ => {
                        return Err(container_err(format!(
                            "is on several networks ({}); set {NETWORK}",
                            names(&c.networks)
                        )))
                    }
                },
            };
            (ip, port)
        }
        AddressMode::Published { host_address } => {
            let host_port = c.published.get(&port).copied().ok_or_else(|| {
                container_err(format!(
                    "container port {port} is not published (--address-mode published)"
                ))
            })?;
            (host_address.clone(), host_port)
        }
    };
    let mut instance = Instance::new(service, &id, &address, port);
    if let Some(tags) = c.labels.get(&tags_l) {
        instance.tags = tags
            .split(',')
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect();
    }
    for (label, value) in &c.labels {
        if let Some(key) = label.strip_prefix(meta_prefix.as_str()) {
            instance.meta.insert(key.to_string(), value.clone());
        }
    }
    if instance.meta.contains_key(OWNER_META) {
        return Err(label_err(
            &format!("{meta_prefix}{OWNER_META}"),
            "reserved: the daemon marks its records with it".into(),
        ));
    }
    instance
        .meta
        .insert(OWNER_META.to_string(), format!("docker:{owner}"));
    if let Some(w) = c.labels.get(&weight_l) {
        instance.weight = w
            .parse()
            .map_err(|_| label_err(&weight_l, "not a number (0-256)".into()))?;
    }
    instance.validate().map_err(|e| match &e {
        ValidationError::Address(_) => container_err(e.to_string()),
        ValidationError::Weight(_) => label_err(&weight_l, e.to_string()),
        ValidationError::Word { field, .. } if *field == "tag" => label_err(&tags_l, e.to_string()),
        _ => container_err(e.to_string()),
    })?;
    Ok(instance)
}

/// True when `instance` was written by the daemon whose owner is `owner`.
pub fn owned_by(instance: &Instance, owner: &str) -> bool {
    instance
        .meta
        .get(OWNER_META)
        .is_some_and(|v| v.strip_prefix("docker:") == Some(owner))
}

fn names(networks: &BTreeMap<String, String>) -> String {
    networks.keys().cloned().collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn web() -> Container {
        Container {
            name: "web-1".into(),
            labels: [(SERVICE, "webapp")]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            networks: [("lb".to_string(), "172.20.0.5".to_string())].into(),
            exposed: vec![3000],
            published: [(3000, 32768)].into(),
        }
    }

    /// The first record of `c` (its only one in these tests: top-level labels only).
    fn instance(
        c: &Container,
        mode: &AddressMode,
        owner: &str,
    ) -> Result<Option<Instance>, LabelError> {
        instances(c, mode, owner, None).map(|v| v.into_iter().next())
    }

    fn label(mut c: Container, k: &str, v: &str) -> Container {
        c.labels.insert(k.to_string(), v.to_string());
        c
    }

    #[test]
    fn a_labelled_container_becomes_a_record() {
        let i = instance(&web(), &AddressMode::Container, "host1")
            .unwrap()
            .unwrap();
        assert_eq!(
            (
                i.service.as_str(),
                i.id.as_str(),
                i.address.as_str(),
                i.port
            ),
            ("webapp", "web-1", "172.20.0.5", 3000)
        );
        assert_eq!(i.meta[OWNER_META], "docker:host1");
        assert!(owned_by(&i, "host1") && !owned_by(&i, "host2"));
        let published = AddressMode::Published {
            host_address: "192.168.1.10".into(),
        };
        let i = instance(&web(), &published, "host1").unwrap().unwrap();
        assert_eq!((i.address.as_str(), i.port), ("192.168.1.10", 32768));
        let c = label(
            label(
                label(label(web(), ID, "w1"), TAGS, "v1, canary"),
                WEIGHT,
                "50",
            ),
            "lb-registry.meta.zone",
            "a",
        );
        let i = instance(&c, &AddressMode::Container, "h").unwrap().unwrap();
        assert_eq!((i.id.as_str(), i.weight), ("w1", 50));
        assert_eq!(i.tags, ["v1", "canary"]);
        assert_eq!(i.meta["zone"], "a");
        // Unlabelled: nothing.
        let mut plain = web();
        plain.labels.clear();
        assert_eq!(
            instance(&plain, &AddressMode::Container, "h").unwrap(),
            None
        );
        // An in-image registrar's record has no owner mark.
        assert!(!owned_by(
            &Instance::new("webapp", "x", "10.0.0.1", 80),
            "h"
        ));
    }

    #[test]
    fn port_groups_register_one_service_each() {
        let m = &AddressMode::Container;
        let mut c = web();
        c.exposed = vec![3000, 9000, 9100];
        let c = label(
            label(
                label(
                    label(c, "lb-registry.9000.service", "admin"),
                    "lb-registry.9000.meta.zone",
                    "b",
                ),
                "lb-registry.9100.service",
                "metrics",
            ),
            "lb-registry.9100.weight",
            "10",
        );
        // The top level (lb-registry.service=webapp on its lb-registry.port) is one more.
        let c = label(label(c, PORT, "3000"), "lb-registry.meta.zone", "a");
        let all = instances(&c, m, "h", None).unwrap();
        let got: Vec<(&str, u16, Option<&str>, u16)> = all
            .iter()
            .map(|i| {
                (
                    i.service.as_str(),
                    i.port,
                    i.meta.get("zone").map(String::as_str),
                    i.weight,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("webapp", 3000, Some("a"), 100),
                ("admin", 9000, Some("b"), 100),
                ("metrics", 9100, None, 10),
            ]
        );
        assert!(all
            .iter()
            .all(|i| i.id == "web-1" && i.address == "172.20.0.5"));
        // Groups alone, without the top level.
        let mut only = c.clone();
        only.labels.remove(SERVICE);
        assert!(is_labelled(&only.labels));
        assert_eq!(instances(&only, m, "h", None).unwrap().len(), 2);
        // Published: each group's own published port.
        only.published = [(9000, 32001), (9100, 32002)].into();
        let p = AddressMode::Published {
            host_address: "192.168.1.10".into(),
        };
        let ports: Vec<u16> = instances(&only, &p, "h", None)
            .unwrap()
            .iter()
            .map(|i| i.port)
            .collect();
        assert_eq!(ports, [32001, 32002]);
        // Errors name the group's label.
        let err = |c: Container| instances(&c, m, "h", None).unwrap_err().to_string();
        assert!(err(label(only.clone(), "lb-registry.9000.weight", "x"))
            .contains("label lb-registry.9000.weight="));
        assert!(err(label(only.clone(), "lb-registry.70000.service", "x"))
            .contains("not a port number"));
        assert!(err(label(only.clone(), "lb-registry.8080.id", "x"))
            .contains("port group 8080 has no lb-registry.8080.service"));
        let same = label(only.clone(), "lb-registry.9100.service", "admin");
        assert!(err(same.clone()).contains("two registrations are admin/web-1"));
        assert_eq!(
            instances(&label(same, "lb-registry.9100.id", "web-1-b"), m, "h", None)
                .unwrap()
                .len(),
            2
        );
        let mut plain = web();
        plain.labels.clear();
        assert!(!is_labelled(&plain.labels));
        assert!(instances(&plain, m, "h", None).unwrap().is_empty());
    }

    #[test]
    fn the_daemons_network_chooses_the_address() {
        let m = &AddressMode::Container;
        let mut c = web();
        c.networks.insert("other".into(), "10.1.0.2".into());
        let i = instances(&c, m, "h", Some("other")).unwrap();
        assert_eq!(i[0].address, "10.1.0.2");
        let e = instances(&label(c, NETWORK, "lb"), m, "h", Some("other"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--network"), "{e}");
    }

    #[test]
    fn bad_labels_are_errors_naming_the_container_and_the_label() {
        let m = &AddressMode::Container;
        let err = |c: Container| instance(&c, m, "h").unwrap_err().to_string();
        let e = err(label(web(), PORT, "abc"));
        assert!(
            e.starts_with("container web-1: label lb-registry.port=\"abc\""),
            "{e}"
        );
        let e = err(label(web(), ID, "has space"));
        assert!(e.contains("label lb-registry.id=\"has space\""), "{e}");
        assert!(err(label(web(), WEIGHT, "300")).contains("lb-registry.weight"));
        assert!(err(label(web(), TAGS, "a b")).contains("lb-registry.tags"));
        assert!(err(label(web(), "lb-registry.meta.x", "a;b")).contains("meta value"));
        assert!(err(label(web(), "lb-registry.meta.registered-by", "me")).contains("reserved"));
        assert!(err(label(web(), SERVICE, "web app")).contains("lb-registry.service"));
        let mut two = web();
        two.exposed = vec![80, 443];
        assert!(err(two).contains("several TCP ports"));
        let mut nets = web();
        nets.networks.insert("other".into(), "10.1.0.2".into());
        assert!(err(nets.clone()).contains("several networks (lb, other)"));
        let chosen = label(nets, NETWORK, "other");
        assert_eq!(
            instance(&chosen, m, "h").unwrap().unwrap().address,
            "10.1.0.2"
        );
        assert!(err(label(web(), NETWORK, "nope")).contains("lb-registry.network"));
        let mut long = web();
        long.name = "x".repeat(70);
        assert!(err(long).contains("set the lb-registry.id label"));
        let unpublished = AddressMode::Published {
            host_address: "192.168.1.10".into(),
        };
        let mut c = web();
        c.published.clear();
        assert!(instance(&c, &unpublished, "h")
            .unwrap_err()
            .to_string()
            .contains("not published"));
    }
}
