//! Where to reach an allocated GameServer's WebUI: the port chosen by name,
//! the address by a configurable preference over address types.
//!
//! `PodIP` pairs with the *container* port (from the GameServer's spec);
//! node address types and the primary `address` pair with the *host* port
//! (from its status). Agones 1.30 reports only `address`; `addresses` came in
//! 1.34 and the `PodIP` entry in 1.40.

use http::uri::Authority;

use super::types::{AllocationStatus, GameServer};
use crate::config::PRIMARY_ADDRESS;

/// The first usable `host:port` by `preference`, or why there is none.
pub fn upstream(
    gs: Option<&GameServer>,
    allocation: Option<&AllocationStatus>,
    port_name: &str,
    preference: &[String],
) -> Result<Authority, String> {
    let status = gs.and_then(|g| g.status.as_ref());
    let name = gs
        .map(GameServer::name)
        .or(allocation.map(|a| a.game_server_name.as_str()))
        .unwrap_or("?");
    let host_port = status
        .map(|s| s.ports.as_slice())
        .filter(|p| !p.is_empty())
        .or(allocation.map(|a| a.ports.as_slice()))
        .unwrap_or_default()
        .iter()
        .find(|p| p.name == port_name)
        .map(|p| p.port);
    let container_port = gs
        .and_then(|g| g.spec.ports.iter().find(|p| p.name == port_name))
        .and_then(|p| p.container_port);
    if host_port.is_none() && container_port.is_none() {
        let mut names: Vec<&str> = status
            .map(|s| s.ports.iter().map(|p| p.name.as_str()).collect())
            .unwrap_or_default();
        if names.is_empty() {
            names = allocation
                .map(|a| a.ports.iter().map(|p| p.name.as_str()).collect())
                .unwrap_or_default();
        }
        if names.is_empty() {
            names = gs
                .map(|g| g.spec.ports.iter().map(|p| p.name.as_str()).collect())
                .unwrap_or_default();
        }
        return Err(format!(
            "GameServer {name} has no port named {port_name:?} (its ports: {names:?})"
        ));
    }
    let addresses = status
        .map(|s| s.addresses.as_slice())
        .filter(|a| !a.is_empty())
        .or(allocation.map(|a| a.addresses.as_slice()))
        .unwrap_or_default();
    let primary = status
        .map(|s| s.address.as_str())
        .filter(|a| !a.is_empty())
        .or(allocation.map(|a| a.address.as_str()))
        .unwrap_or_default();
    for kind in preference {
        let (host, port) = if kind == PRIMARY_ADDRESS {
            (Some(primary).filter(|a| !a.is_empty()), host_port)
        } else {
            let host = addresses.iter().find(|a| a.kind == *kind).map(|a| a.address.as_str());
            let port = if kind == "PodIP" { container_port } else { host_port };
            (host, port)
        };
        if let (Some(host), Some(port)) = (host, port) {
            let text = if host.contains(':') {
                format!("[{host}]:{port}")
            } else {
                format!("{host}:{port}")
            };
            return text
                .parse()
                .map_err(|_| format!("GameServer {name}: {text:?} is not a usable address"));
        }
    }
    Err(format!(
        "GameServer {name} has no address of the preferred types {preference:?} with port {port_name:?}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::allocator::agones::types::{GameServerSpec, GameServerStatus, NodeAddress, SpecPort, StatusPort};

    fn gs(addresses: &[(&str, &str)]) -> GameServer {
        GameServer {
            metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                name: Some("gs-1".into()),
                ..Default::default()
            },
            spec: GameServerSpec {
                ports: vec![
                    SpecPort {
                        name: "default".into(),
                        container_port: Some(9357),
                    },
                    SpecPort {
                        name: "sd".into(),
                        container_port: Some(7860),
                    },
                ],
            },
            status: Some(GameServerStatus {
                state: "Allocated".into(),
                address: "34.1.2.3".into(),
                addresses: addresses
                    .iter()
                    .map(|(k, a)| NodeAddress {
                        kind: k.to_string(),
                        address: a.to_string(),
                    })
                    .collect(),
                ports: vec![
                    StatusPort {
                        name: "default".into(),
                        port: 7001,
                    },
                    StatusPort {
                        name: "sd".into(),
                        port: 7741,
                    },
                ],
                node_name: "node-1".into(),
            }),
            undecodable: None,
        }
    }

    fn default_preference() -> Vec<String> {
        vec!["PodIP".into(), "InternalIP".into(), PRIMARY_ADDRESS.into()]
    }

    #[test]
    fn pod_ip_pairs_with_the_container_port() {
        let g = gs(&[("InternalIP", "10.128.0.7"), ("PodIP", "10.4.0.9")]);
        assert_eq!(
            upstream(Some(&g), None, "sd", &default_preference()).unwrap(),
            "10.4.0.9:7860"
        );
    }

    #[test]
    fn node_addresses_pair_with_the_host_port_by_name_not_position() {
        let g = gs(&[("InternalIP", "10.128.0.7")]);
        assert_eq!(
            upstream(Some(&g), None, "sd", &default_preference()).unwrap(),
            "10.128.0.7:7741"
        );
        let agones_1_30 = gs(&[]);
        assert_eq!(
            upstream(Some(&agones_1_30), None, "sd", &default_preference()).unwrap(),
            "34.1.2.3:7741"
        );
    }

    #[test]
    fn the_seed_allocator_response_alone_routes_by_host_port() {
        let seed: AllocationStatus = serde_json::from_str(include_str!("testdata/allocation_result.json")).unwrap();
        let got = upstream(None, Some(&seed), "sd", &default_preference()).unwrap();
        assert_eq!(
            got.port_u16(),
            Some(seed.ports.iter().find(|p| p.name == "sd").unwrap().port)
        );
    }

    #[test]
    fn a_missing_port_name_is_a_clear_error() {
        let g = gs(&[("PodIP", "10.4.0.9")]);
        let err = upstream(Some(&g), None, "webui", &default_preference()).unwrap_err();
        assert!(
            err.contains("gs-1") && err.contains("webui") && err.contains("default") && err.contains("sd"),
            "{err}"
        );
    }

    #[test]
    fn ipv6_pod_addresses_are_bracketed() {
        let g = gs(&[("PodIP", "fd00::9")]);
        assert_eq!(
            upstream(Some(&g), None, "sd", &default_preference()).unwrap(),
            "[fd00::9]:7860"
        );
    }
}
