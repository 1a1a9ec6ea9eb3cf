//! Key layout: `<prefix>/<service>/<id>`, default prefix `/services`.
//!
//! The prefix is normalised to have no trailing slash; a service's keys live under
//! `<prefix>/<service>/` so that a prefix read of one service never matches another
//! whose name merely starts the same way.

/// Default key prefix.
pub const DEFAULT_PREFIX: &str = "/services";

/// Normalises a prefix: no trailing slash (but `/` stays as the empty prefix + `/`).
pub fn normalize_prefix(prefix: &str) -> String {
    prefix.trim_end_matches('/').to_string()
}

/// The key prefix under which every instance lives: `<prefix>/`.
pub fn root_prefix(prefix: &str) -> String {
    format!("{}/", normalize_prefix(prefix))
}

/// The key prefix of one service: `<prefix>/<service>/`.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    format!("{}/{}/", normalize_prefix(prefix), service)
}

/// The key of one instance: `<prefix>/<service>/<id>`.
pub fn instance_key(prefix: &str, service: &str, id: &str) -> String {
    format!("{}/{}/{}", normalize_prefix(prefix), service, id)
}

/// Splits a key into `(service, id)` if it has the layout `<prefix>/<service>/<id>`.
/// Returns `None` for keys outside the prefix or with a different depth.
pub fn parse_key<'a>(prefix: &str, key: &'a str) -> Option<(&'a str, &'a str)> {
    let root = root_prefix(prefix);
    let rest = key.strip_prefix(root.as_str())?;
    let (service, id) = rest.split_once('/')?;
    if service.is_empty() || id.is_empty() || id.contains('/') {
        return None;
    }
    Some((service, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_and_parse_round_trip() {
        let k = instance_key("/services/", "webapp", "s1");
        assert_eq!(k, "/services/webapp/s1");
        assert_eq!(parse_key("/services", &k), Some(("webapp", "s1")));
        assert_eq!(service_prefix("/services", "web"), "/services/web/");
        assert_eq!(root_prefix("/services"), "/services/");
    }

    #[test]
    fn parse_rejects_other_layouts() {
        assert_eq!(parse_key("/services", "/services/webapp"), None);
        assert_eq!(parse_key("/services", "/services/webapp/s1/x"), None);
        assert_eq!(parse_key("/services", "/servicesX/webapp/s1"), None);
        assert_eq!(parse_key("/services", "/services//s1"), None);
        assert_eq!(parse_key("/services", "/other/webapp/s1"), None);
    }
}
