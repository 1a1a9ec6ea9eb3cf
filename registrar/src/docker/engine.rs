//! What the engine says about a container, in our terms: the inspect answer as a
//! [`Container`] for [`super::labels`], whether a `kill` event's signal stops it, whether
//! an answer means "no such container".

use bollard::models::ContainerInspectResponse;

use super::labels::Container;

/// Signals that mean "stop" whatever the container's own stop signal is.
const STOP_SIGNALS: [&str; 4] = ["SIGTERM", "SIGKILL", "SIGINT", "SIGQUIT"];

/// The engine's view of a container, as [`super::labels::instances`] needs it.
pub(super) fn view(c: &ContainerInspectResponse) -> Container {
    let config = c.config.as_ref();
    let labels = config
        .and_then(|c| c.labels.clone())
        .unwrap_or_default()
        .into_iter()
        .collect();
    let mut exposed: Vec<u16> = config
        .and_then(|c| c.exposed_ports.clone())
        .unwrap_or_default()
        .iter()
        .filter_map(|p| p.strip_suffix("/tcp")?.parse().ok())
        .collect();
    exposed.sort_unstable();
    exposed.dedup();
    let settings = c.network_settings.as_ref();
    let networks = settings
        .and_then(|s| s.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(name, ep)| {
            let ip = ep.ip_address.filter(|ip| !ip.is_empty())?;
            Some((name, ip))
        })
        .collect();
    let published = settings
        .and_then(|s| s.ports.clone())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|(port, bindings)| {
            let port: u16 = port.strip_suffix("/tcp")?.parse().ok()?;
            let host: u16 = bindings?
                .iter()
                .find_map(|b| b.host_port.as_deref()?.parse().ok())?;
            Some((port, host))
        })
        .collect();
    Container {
        name: c
            .name
            .as_deref()
            .unwrap_or_default()
            .trim_start_matches('/')
            .to_string(),
        labels,
        networks,
        exposed,
        published,
    }
}

/// True when `signal` (as Docker's `kill` event gives it: "15", "SIGTERM" or "TERM") stops
/// the container: its own stop signal, or one of [`STOP_SIGNALS`].
pub(super) fn is_stop_signal(signal: &str, stop_signal: &str) -> bool {
    let name = |s: &str| -> String {
        let s = s.trim().to_ascii_uppercase();
        let s = match s.parse::<i32>() {
            Ok(n) => nix::sys::signal::Signal::try_from(n)
                .map(|sig| sig.as_str().to_string())
                .unwrap_or(s),
            Err(_) => s,
        };
        if s.starts_with("SIG") {
            s
        } else {
            format!("SIG{s}")
        }
    };
    let signal = name(signal);
    signal == name(stop_signal) || STOP_SIGNALS.contains(&signal.as_str())
}

pub(super) fn not_found(e: &bollard::errors::Error) -> bool {
    matches!(
        e,
        bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stop_signals_in_every_spelling() {
        for s in ["15", "SIGTERM", "TERM", "9", "SIGKILL", "2", "3"] {
            assert!(is_stop_signal(s, "SIGTERM"), "{s}");
        }
        for s in ["1", "SIGHUP", "10", "USR2", "28"] {
            assert!(!is_stop_signal(s, "SIGTERM"), "{s}");
        }
        // Apache stops gracefully on SIGWINCH: its stop signal counts.
        assert!(is_stop_signal("28", "SIGWINCH"));
        assert!(is_stop_signal("WINCH", "WINCH"));
    }
}
