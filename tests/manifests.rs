//! The deployment files — `Dockerfile`, `.dockerignore`, `k8s/` — agree with
//! each other, with the router's own config validation, and with the
//! Kubernetes API calls the code makes. No cluster, container engine or
//! network: `k8s/` is rendered by a small kustomize model
//! (`manifests/kustomize.rs`, cross-checked against `kubectl kustomize` where
//! kubectl is installed), every object is typed (`manifests/schema.rs`) and
//! the code's API calls are read from `src/` (`manifests/code.rs`).

#[path = "manifests/code.rs"]
mod code;
#[path = "manifests/dockerfile.rs"]
mod dockerfile;
#[path = "manifests/kustomize.rs"]
mod kustomize;
#[path = "manifests/schema.rs"]
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Container, PodSpec, ServicePort, Volume};
use k8s_openapi::api::rbac::v1::Role;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;
use session_router::config::{BackendKind, Config};

use kustomize::Rendered;
use schema::{one, Bundle, Fleet};

const SECRET: &[u8] = b"a-test-cookie-secret-of-at-least-32-bytes";
const CONFIG_PATH: &str = "/etc/session-router/config.toml";
const ROUTER_CONTAINER: &str = "session-router";
const TRANSPORT: &str = "src/allocator/agones/transport.rs";
/// The `shared` kind's EndpointSlice watch: only the shared-model overlay
/// runs it, so only its Role grants what it calls.
const SHARED_WATCH: &str = "src/allocator/shared/endpoints.rs";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(relative: &str) -> String {
    std::fs::read_to_string(root().join(relative)).unwrap_or_else(|e| panic!("cannot read {relative}: {e}"))
}

/// One rendering of a kustomization, typed, with the router config it mounts.
struct Deploy {
    dir: &'static str,
    rendered: Rendered,
    bundle: Bundle,
    config: Config,
}

fn base() -> Deploy {
    render("k8s")
}

fn allocator_overlay() -> Deploy {
    render("k8s/overlays/agones-allocator")
}

fn webhook_overlay() -> Deploy {
    render("k8s/overlays/webhook-autoscaler")
}

fn shared_overlay() -> Deploy {
    render("k8s/overlays/shared-model")
}

fn render(dir: &'static str) -> Deploy {
    let rendered = kustomize::build(&root().join(dir));
    let bundle = Bundle::parse(&rendered.objects);
    let config = router_config(dir, &bundle);
    Deploy {
        dir,
        rendered,
        bundle,
        config,
    }
}

impl Deploy {
    fn deployment(&self) -> &Deployment {
        router_deployment(&self.bundle, self.dir)
    }
    fn pod(&self) -> &PodSpec {
        pod_spec(self.deployment())
    }
    fn router(&self) -> &Container {
        container(self.pod(), ROUTER_CONTAINER)
    }
    fn pod_labels(&self) -> BTreeMap<String, String> {
        template_labels(self.deployment())
    }
    fn fleet(&self) -> &Fleet {
        one(&self.bundle.fleets, &format!("Fleet in {}", self.dir))
    }
    fn role(&self) -> &Role {
        one(&self.bundle.roles, &format!("Role in {}", self.dir))
    }
    fn namespace_of(&self, kind: &str, name: &str) -> String {
        let o = self
            .rendered
            .objects
            .iter()
            .find(|o| o.kind() == kind && o.name() == name)
            .unwrap_or_else(|| panic!("{}: no {kind} {name}", self.dir));
        o.value["metadata"]["namespace"]
            .as_str()
            .unwrap_or_else(|| panic!("{}: {kind} {name} has no namespace", self.dir))
            .to_string()
    }
}

/// The router's Deployment (an overlay may add others, e.g. a model's).
fn router_deployment<'a>(bundle: &'a Bundle, dir: &str) -> &'a Deployment {
    let routers: Vec<&Deployment> = bundle
        .deployments
        .iter()
        .filter(|d| d.metadata.name.as_deref() == Some(ROUTER_CONTAINER))
        .collect();
    assert_eq!(routers.len(), 1, "{dir}: expected one Deployment {ROUTER_CONTAINER}");
    routers[0]
}

fn pod_spec(d: &Deployment) -> &PodSpec {
    d.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("a pod spec")
}

fn template_labels(d: &Deployment) -> BTreeMap<String, String> {
    d.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

fn container<'a>(pod: &'a PodSpec, name: &str) -> &'a Container {
    pod.containers
        .iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// The container port a Service port forwards to.
fn service_target(port: &ServicePort, c: &Container) -> i32 {
    match &port.target_port {
        Some(IntOrString::String(name)) => container_port(c, name),
        Some(IntOrString::Int(n)) => *n,
        None => port.port,
    }
}

fn container_port(c: &Container, name: &str) -> i32 {
    c.ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .unwrap_or_else(|| panic!("container {} has no port named {name}", c.name))
        .container_port
}

fn fleet_pod_labels(fleet: &Fleet) -> BTreeMap<String, String> {
    fleet
        .spec
        .template
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default()
}

/// Does `selector` select an object with `labels`?
fn selects(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_label = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let by_expression = selector.match_expressions.iter().flatten().all(|e| {
        let value = labels.get(&e.key);
        let values = e.values.clone().unwrap_or_default();
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            other => panic!("unknown selector operator {other}"),
        }
    });
    let empty = selector.match_labels.as_ref().is_none_or(|m| m.is_empty())
        && selector.match_expressions.as_ref().is_none_or(|e| e.is_empty());
    !empty && by_label && by_expression
}

fn map_selector(labels: &BTreeMap<String, String>) -> LabelSelector {
    LabelSelector {
        match_labels: Some(labels.clone()),
        ..LabelSelector::default()
    }
}

/// Bytes, or millicores for CPU: `64Mi`, `1Gi`, `100m`, `1`.
fn quantity(q: &str) -> f64 {
    let units = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("m", 0.001),
    ];
    for (suffix, factor) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().unwrap() * factor;
        }
    }
    q.parse().unwrap_or_else(|_| panic!("unsupported quantity {q:?}"))
}

/// The router config the Deployment mounts, validated by the router itself.
/// File paths it names (the allocator's certificates) must be files of a
/// mounted Secret volume; for validation they are stood in for by temporary
/// files, since the real ones only exist in the pod.
fn router_config(dir: &str, bundle: &Bundle) -> Config {
    let pod = pod_spec(router_deployment(bundle, dir));
    let router = container(pod, ROUTER_CONTAINER);
    let (config_dir, config_file) = CONFIG_PATH.rsplit_once('/').unwrap();
    let mount = router
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == config_dir)
        .unwrap_or_else(|| panic!("{dir}: nothing mounted at {config_dir}, where the image reads its config"));
    let volume = volume(pod, &mount.name);
    let map_name = &volume
        .config_map
        .as_ref()
        .unwrap_or_else(|| panic!("{dir}: {config_dir} is not a ConfigMap volume"))
        .name;
    let map = bundle
        .config_maps
        .iter()
        .find(|m| m.metadata.name.as_deref() == Some(map_name))
        .unwrap_or_else(|| panic!("{dir}: the Deployment mounts ConfigMap {map_name}, which is not rendered"));
    let text = map
        .data
        .as_ref()
        .and_then(|d| d.get(config_file))
        .unwrap_or_else(|| panic!("{dir}: ConfigMap {map_name} has no key {config_file}"));

    let mut table: toml::Table = text
        .parse()
        .unwrap_or_else(|e| panic!("{dir}: config is not TOML: {e}"));
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("manifests");
    std::fs::create_dir_all(&scratch).unwrap();
    if let Some(agones) = table
        .get_mut("backend")
        .and_then(|b| b.get_mut("agones"))
        .and_then(|a| a.as_table_mut())
    {
        for key in [
            "allocator_ca_file",
            "allocator_client_cert_file",
            "allocator_client_key_file",
        ] {
            let Some(path) = agones.get(key).and_then(|v| v.as_str()).map(str::to_string) else {
                continue;
            };
            assert!(
                mounted_secret_file(pod, router, &path),
                "{dir}: backend.agones.{key} = {path:?} is not a file of a Secret volume mounted in the router"
            );
            let stand_in = scratch.join(key);
            std::fs::write(&stand_in, "stand-in").unwrap();
            agones.insert(key.into(), toml::Value::String(stand_in.display().to_string()));
        }
    }
    Config::from_toml(&table.to_string(), Some(SECRET.to_vec()))
        .unwrap_or_else(|e| panic!("{dir}: the router rejects its ConfigMap's config.toml:\n{e}"))
}

fn volume<'a>(pod: &'a PodSpec, name: &str) -> &'a Volume {
    pod.volumes
        .iter()
        .flatten()
        .find(|v| v.name == name)
        .unwrap_or_else(|| panic!("no volume {name}"))
}

/// Is `path` a file that a mounted Secret (or projected Secrets) volume provides?
fn mounted_secret_file(pod: &PodSpec, c: &Container, path: &str) -> bool {
    let Some((dir, file)) = path.rsplit_once('/') else {
        return false;
    };
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path == dir)
        .any(|m| {
            let v = volume(pod, &m.name);
            let from_secret = v
                .secret
                .iter()
                .flat_map(|s| s.items.iter().flatten())
                .any(|i| i.path == file);
            let from_projection = v
                .projected
                .iter()
                .flat_map(|p| p.sources.iter().flatten())
                .flat_map(|s| s.secret.iter())
                .flat_map(|s| s.items.iter().flatten())
                .any(|i| i.path == file);
            from_secret || from_projection
        })
}

fn role_permissions(role: &Role) -> BTreeSet<code::Permission> {
    let mut out = BTreeSet::new();
    for rule in role.rules.iter().flatten() {
        let name = role.metadata.name.as_deref().unwrap_or("?");
        assert!(
            rule.resource_names.is_none(),
            "Role {name}: resourceNames are not modelled"
        );
        assert!(
            rule.non_resource_urls.is_none(),
            "Role {name}: nonResourceURLs in a Role"
        );
        for group in rule.api_groups.iter().flatten() {
            for resource in rule.resources.iter().flatten() {
                for verb in &rule.verbs {
                    for part in [group, resource, verb] {
                        assert_ne!(part, "*", "Role {name}: a wildcard grants more than the code uses");
                    }
                    out.insert((group.clone(), resource.clone(), verb.clone()));
                }
            }
        }
    }
    out
}

fn describe(perms: &BTreeSet<code::Permission>) -> String {
    perms
        .iter()
        .map(|(g, r, v)| format!("{g}/{r}: {v}"))
        .collect::<Vec<_>>()
        .join(", ")
}

#[test]
fn every_manifest_is_typed_and_no_field_is_dropped() {
    // The webhook overlay adds a NetworkPolicy for the router's pods.
    for (deploy, network_policies) in [(base(), 1), (allocator_overlay(), 1), (webhook_overlay(), 2)] {
        let b = &deploy.bundle;
        let counts = [
            ("ServiceAccount", b.service_accounts.len()),
            ("Role", b.roles.len()),
            ("RoleBinding", b.role_bindings.len()),
            ("ConfigMap", b.config_maps.len() - 1),
            ("Deployment", b.deployments.len()),
            ("PodDisruptionBudget", b.pdbs.len()),
            ("Service", b.services.len()),
            ("Ingress", b.ingresses.len()),
            ("NetworkPolicy", b.network_policies.len() + 1 - network_policies),
            ("BackendConfig", b.backend_configs.len()),
            ("ManagedCertificate", b.certificates.len()),
            ("Fleet", b.fleets.len()),
            ("FleetAutoscaler", b.autoscalers.len()),
            ("PodMonitoring", b.pod_monitorings.len()),
        ];
        for (kind, n) in counts {
            assert_eq!(n, 1, "{}: expected one {kind}, rendered {n}", deploy.dir);
        }
        // Two ConfigMaps: the router's config and the Grafana dashboard.
        assert_eq!(
            deploy.rendered.objects.len(),
            counts.len() + 1 + (network_policies - 1),
            "{}",
            deploy.dir
        );
    }
}

#[test]
fn the_typed_check_catches_a_misspelt_field() {
    let written: Value = serde_json::json!({
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
        "spec": {"selector": {"a": "b"}, "ports": [{"port": 80, "targetPort": "http", "protcol": "TCP"}]}
    });
    let typed: k8s_openapi::api::core::v1::Service = serde_json::from_value(written.clone()).unwrap();
    let mut dropped = Vec::new();
    schema::dropped_fields(&written, &serde_json::to_value(typed).unwrap(), "", &mut dropped);
    assert_eq!(dropped, vec![".spec.ports[0].protcol".to_string()]);
}

#[test]
fn every_file_under_k8s_is_used_by_a_kustomization() {
    fn walk(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(&path, out);
            } else {
                out.insert(path);
            }
        }
    }
    fn used(dir: &Path, out: &mut BTreeSet<PathBuf>) {
        let file = dir.join("kustomization.yaml");
        let k = kustomize::yaml_documents(&std::fs::read_to_string(&file).unwrap(), "kustomization").remove(0);
        out.insert(file);
        for r in k["resources"].as_array().into_iter().flatten() {
            let path = dir.join(r.as_str().unwrap());
            if path.is_dir() {
                used(&path, out);
            } else {
                out.insert(path);
            }
        }
        for g in k["configMapGenerator"].as_array().into_iter().flatten() {
            for f in g["files"].as_array().into_iter().flatten() {
                let f = f.as_str().unwrap();
                out.insert(dir.join(f.split_once('=').map_or(f, |(_, p)| p)));
            }
        }
        for p in k["patches"].as_array().into_iter().flatten() {
            out.insert(dir.join(p["path"].as_str().unwrap()));
        }
    }
    let k8s = root().join("k8s");
    let mut present = BTreeSet::new();
    walk(&k8s, &mut present);
    let mut referenced = BTreeSet::new();
    used(&k8s, &mut referenced);
    used(&k8s.join("overlays/agones-allocator"), &mut referenced);
    used(&k8s.join("overlays/webhook-autoscaler"), &mut referenced);
    used(&k8s.join("overlays/shared-model"), &mut referenced);
    let normalize = |set: BTreeSet<PathBuf>| -> BTreeSet<PathBuf> {
        set.into_iter()
            .map(|p| std::fs::canonicalize(&p).unwrap_or(p))
            .collect()
    };
    let (present, referenced) = (normalize(present), normalize(referenced));
    let unused: Vec<_> = present.difference(&referenced).collect();
    let missing: Vec<_> = referenced.difference(&present).collect();
    assert!(unused.is_empty(), "files under k8s/ no kustomization uses: {unused:?}");
    assert!(
        missing.is_empty(),
        "kustomizations name files that do not exist: {missing:?}"
    );
}

#[test]
fn the_config_maps_pass_the_routers_own_validation() {
    let base = base();
    assert_eq!(base.config.backend.kind, BackendKind::Agones);
    let overlay = allocator_overlay();
    assert_eq!(overlay.config.backend.kind, BackendKind::AgonesAllocator);
    assert!(overlay.config.backend.agones.allocator_url.is_some());

    // The two configs differ only where the allocator mode needs them to.
    let strip = |generated: &BTreeMap<String, BTreeMap<String, PathBuf>>| -> toml::Table {
        let file = &generated["session-router-config"]["config.toml"];
        let mut t: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
        let backend = t["backend"].as_table_mut().unwrap();
        backend.remove("kind");
        let agones = backend["agones"].as_table_mut().unwrap();
        agones.retain(|k, _| !k.starts_with("allocator_"));
        t
    };
    assert_eq!(
        strip(&base.rendered.generated),
        strip(&overlay.rendered.generated),
        "k8s/overlays/agones-allocator/config.toml must equal k8s/router/config.toml except backend.kind and allocator_*"
    );
    assert_eq!(
        base.config.server.autoscaler_listen, None,
        "the base keeps the Buffer policy"
    );

    let webhook = webhook_overlay();
    assert!(webhook.config.server.autoscaler_listen.is_some());
    let without_webhook = |generated: &BTreeMap<String, BTreeMap<String, PathBuf>>| -> toml::Table {
        let file = &generated["session-router-config"]["config.toml"];
        let mut t: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
        t.remove("autoscaler");
        t["server"].as_table_mut().unwrap().remove("autoscaler_listen");
        t
    };
    assert_eq!(
        without_webhook(&base.rendered.generated),
        without_webhook(&webhook.rendered.generated),
        "k8s/overlays/webhook-autoscaler/config.toml must equal k8s/router/config.toml except server.autoscaler_listen and [autoscaler]"
    );
    for deploy in [&base, &overlay, &webhook] {
        let c = &deploy.config;
        assert!(
            c.server.keepalive_timeout > Duration::from_secs(600),
            "{}: keepalive_timeout must exceed the Google load balancer's 600 s",
            deploy.dir
        );
        assert_eq!(
            c.session.cookie_secret.expose(),
            SECRET,
            "the secret comes from the environment, never the file"
        );
    }
}

#[test]
fn the_deployment_serves_probes_and_metrics_where_the_config_listens() {
    for deploy in [base(), allocator_overlay(), webhook_overlay()] {
        let router = deploy.router();
        let http = container_port(router, "http");
        assert_eq!(
            http as u16,
            deploy.config.server.listen.port(),
            "{}: the http containerPort must be server.listen's port",
            deploy.dir
        );
        let metrics = deploy
            .config
            .server
            .metrics_listen
            .expect("server.metrics_listen is set");
        assert_eq!(
            container_port(router, "metrics") as u16,
            metrics.port(),
            "{}",
            deploy.dir
        );
        assert!(
            deploy.config.server.listen.ip().is_unspecified(),
            "listen on all interfaces in a pod"
        );
        for (probe, path) in [
            (&router.liveness_probe, "/healthz"),
            (&router.readiness_probe, "/readyz"),
        ] {
            let get = probe
                .as_ref()
                .and_then(|p| p.http_get.as_ref())
                .unwrap_or_else(|| panic!("{}: an HTTP probe on {path}", deploy.dir));
            assert_eq!(get.path.as_deref(), Some(path), "{}", deploy.dir);
            let port = match &get.port {
                IntOrString::String(name) => container_port(router, name),
                IntOrString::Int(n) => *n,
            };
            assert_eq!(port, http, "{}: {path} is served on the main port", deploy.dir);
        }
    }
}

#[test]
fn the_deployment_runs_hardened_with_measured_resources() {
    let deploy = base();
    let d = deploy.deployment();
    let pod = deploy.pod();
    assert_eq!(d.spec.as_ref().unwrap().replicas, Some(2));
    let psc = pod.security_context.as_ref().expect("a pod securityContext");
    assert_eq!(psc.run_as_non_root, Some(true));
    assert!(psc.run_as_user.is_some_and(|u| u > 0), "a numeric non-root user");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_ne!(
        pod.automount_service_account_token,
        Some(false),
        "the in-cluster config needs the token"
    );
    for c in &pod.containers {
        let sc = c.security_context.as_ref().expect("a container securityContext");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.read_only_root_filesystem, Some(true), "{}", c.name);
        assert_ne!(sc.privileged, Some(true), "{}", c.name);
        let dropped = sc
            .capabilities
            .as_ref()
            .and_then(|c| c.drop.clone())
            .unwrap_or_default();
        assert!(dropped.iter().any(|d| d == "ALL"), "{}: drop ALL capabilities", c.name);
        assert!(
            sc.capabilities.as_ref().and_then(|c| c.add.as_ref()).is_none(),
            "{}: adds no capability",
            c.name
        );
        let resources = c.resources.as_ref().expect("resources");
        let requests = resources.requests.clone().unwrap_or_default();
        let limits = resources.limits.clone().unwrap_or_default();
        for r in ["cpu", "memory"] {
            let (req, lim) = (
                requests.get(r).unwrap_or_else(|| panic!("{}: a {r} request", c.name)),
                limits.get(r).unwrap_or_else(|| panic!("{}: a {r} limit", c.name)),
            );
            assert!(
                quantity(&req.0) <= quantity(&lim.0),
                "{}: {r} request above its limit",
                c.name
            );
        }
        // The peak measured for the comment in deployment.yaml (70 MB) must
        // fit under the limit with room for socket buffers.
        assert!(
            quantity(&limits["memory"].0) >= 2.0 * 70e6,
            "memory limit below twice the measured peak"
        );
        for env in c.env.iter().flatten() {
            let secretish = ["SECRET", "TOKEN", "PASSWORD", "KEY"]
                .iter()
                .any(|s| env.name.contains(s));
            assert!(
                !(secretish && env.value.is_some()),
                "{}: {} is a literal value; secrets come from a Secret",
                c.name,
                env.name
            );
        }
    }
    assert!(
        deploy.router().command.is_none(),
        "no command: the image's ENTRYPOINT (`serve --config …`) runs"
    );
}

#[test]
fn the_drain_fits_in_the_termination_grace_period() {
    let deploy = base();
    let pod = deploy.pod();
    let grace = pod
        .termination_grace_period_seconds
        .expect("terminationGracePeriodSeconds");
    let pre_stop = deploy
        .router()
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .and_then(|p| p.sleep.as_ref())
        .map_or(0, |s| s.seconds);
    let drain = deploy.config.server.drain_timeout.as_secs() as i64;
    assert!(
        grace > pre_stop + drain,
        "terminationGracePeriodSeconds {grace} must exceed preStop {pre_stop} s + drain_timeout {drain} s"
    );
    let lb_draining = one(&deploy.bundle.backend_configs, "BackendConfig")
        .spec
        .connection_draining
        .as_ref()
        .expect("connectionDraining")
        .draining_timeout_sec;
    assert!(
        lb_draining <= pre_stop + drain,
        "the load balancer drains for {lb_draining} s but the pod stops serving after {} s",
        pre_stop + drain
    );
}

#[test]
fn every_selector_matches_the_labels_it_is_meant_to() {
    let deploy = base();
    let router_pods = deploy.pod_labels();
    let webui_pods = fleet_pod_labels(deploy.fleet());
    let spec = deploy.deployment().spec.as_ref().unwrap();
    assert!(
        selects(&spec.selector, &router_pods),
        "Deployment selector vs its template"
    );

    let service = one(&deploy.bundle.services, "Service");
    let service_selector = service
        .spec
        .as_ref()
        .unwrap()
        .selector
        .clone()
        .expect("a Service selector");
    assert!(
        selects(&map_selector(&service_selector), &router_pods),
        "Service → router pods"
    );
    assert!(
        !selects(&map_selector(&service_selector), &webui_pods),
        "Service must not reach WebUI pods"
    );

    let pdb = one(&deploy.bundle.pdbs, "PodDisruptionBudget");
    let pdb_spec = pdb.spec.as_ref().unwrap();
    assert!(
        selects(pdb_spec.selector.as_ref().unwrap(), &router_pods),
        "PDB → router pods"
    );
    let min_available = match pdb_spec.min_available.as_ref().expect("minAvailable") {
        IntOrString::Int(n) => *n,
        IntOrString::String(s) => panic!("minAvailable {s}: use a count"),
    };
    assert!(
        (1..spec.replicas.unwrap()).contains(&min_available),
        "the PDB keeps one router up and still lets a node drain"
    );

    let spread = deploy.pod().topology_spread_constraints.clone().unwrap_or_default();
    assert!(
        spread.iter().any(|t| t.topology_key == "topology.kubernetes.io/zone"),
        "spread over zones"
    );
    assert!(
        spread.iter().any(|t| t.topology_key == "kubernetes.io/hostname"),
        "spread over nodes"
    );
    for t in &spread {
        assert!(
            selects(t.label_selector.as_ref().unwrap(), &router_pods),
            "spread of {} counts router pods",
            t.topology_key
        );
    }

    let sa = one(&deploy.bundle.service_accounts, "ServiceAccount");
    assert_eq!(deploy.pod().service_account_name, sa.metadata.name);
    let binding = one(&deploy.bundle.role_bindings, "RoleBinding");
    assert_eq!(binding.role_ref.kind, "Role");
    assert_eq!(Some(&binding.role_ref.name), deploy.role().metadata.name.as_ref());
    let subject = one(binding.subjects.as_deref().unwrap_or_default(), "RoleBinding subject");
    assert_eq!(subject.kind, "ServiceAccount");
    assert_eq!(Some(&subject.name), sa.metadata.name.as_ref());
    assert_eq!(
        subject.namespace.as_deref(),
        Some(
            deploy
                .namespace_of("ServiceAccount", sa.metadata.name.as_deref().unwrap())
                .as_str()
        )
    );
}

#[test]
fn the_load_balancer_chain_is_wired_service_backendconfig_ingress_certificate() {
    let deploy = base();
    let b = &deploy.bundle;
    let service = one(&b.services, "Service");
    let annotations = service.metadata.annotations.clone().unwrap_or_default();
    let neg: Value = serde_json::from_str(&annotations["cloud.google.com/neg"]).expect("NEG annotation is JSON");
    assert_eq!(neg["ingress"], true, "container-native load balancing");
    let backend_ref: Value =
        serde_json::from_str(&annotations["cloud.google.com/backend-config"]).expect("backend-config annotation");
    let backend_config = one(&b.backend_configs, "BackendConfig");
    assert_eq!(
        backend_ref["default"].as_str(),
        backend_config.metadata.name.as_deref(),
        "the Service names the BackendConfig"
    );

    let port = one(service.spec.as_ref().unwrap().ports.as_deref().unwrap(), "Service port");
    let http = container_port(deploy.router(), "http");
    match port.target_port.as_ref().expect("targetPort") {
        IntOrString::String(name) => assert_eq!(container_port(deploy.router(), name), http),
        IntOrString::Int(n) => assert_eq!(*n, http),
    }

    let spec = &backend_config.spec;
    let health = spec.health_check.as_ref().expect("a health check");
    assert_eq!(
        health.request_path, "/healthz",
        "the LB health check must not hit the WebUI"
    );
    assert_eq!(health.protocol, "HTTP");
    assert_eq!(health.port, http, "NEG health checks go to the container port");
    assert!(
        spec.timeout_sec.unwrap_or(30) >= 900,
        "timeoutSec caps WebSocket and generation lifetime: at least the original's 900 s"
    );
    let iap = spec.iap.as_ref().expect("IAP");
    assert!(iap.enabled);

    let ingress = one(&b.ingresses, "Ingress");
    let backend = ingress
        .spec
        .as_ref()
        .and_then(|s| s.default_backend.as_ref())
        .and_then(|d| d.service.as_ref())
        .expect("a default backend Service");
    assert_eq!(Some(&backend.name), service.metadata.name.as_ref());
    assert_eq!(backend.port.as_ref().and_then(|p| p.number), Some(port.port));
    let ingress_annotations = ingress.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ingress_annotations
            .get("kubernetes.io/ingress.class")
            .map(String::as_str),
        Some("gce")
    );
    let certificate = one(&b.certificates, "ManagedCertificate");
    assert_eq!(
        ingress_annotations.get("networking.gke.io/managed-certificates"),
        certificate.metadata.name.as_ref()
    );
    assert!(!certificate.spec.domains.is_empty());
    let address = &ingress_annotations["kubernetes.io/ingress.global-static-ip-name"];
    let guide = read("DEPLOY.md");
    assert!(
        guide.contains(&format!("gcloud compute addresses create {address} --global")),
        "DEPLOY.md reserves the address the Ingress names ({address})"
    );
}

#[test]
fn the_role_grants_exactly_the_api_calls_the_code_makes() {
    let calls = code::api_calls();
    let needed = code::needed_except(&calls, &[SHARED_WATCH]);
    assert!(!needed.is_empty(), "the source reader found no Kubernetes calls at all");
    let granted = role_permissions(base().role());
    let missing: BTreeSet<_> = needed.difference(&granted).cloned().collect();
    let extra: BTreeSet<_> = granted.difference(&needed).cloned().collect();
    let evidence: Vec<String> = missing
        .iter()
        .flat_map(|p| calls[p].iter().map(move |e| format!("  {}/{} {}: {e}", p.0, p.1, p.2)))
        .collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "k8s/router/rbac.yaml must grant exactly what the code uses (but {SHARED_WATCH}).\nmissing: {}\n{}\nnot used by any code in {:?}: {}",
        describe(&missing),
        evidence.join("\n"),
        code::KUBE_DIRS,
        describe(&extra)
    );
}

#[test]
fn the_allocator_overlay_drops_only_the_allocation_permission_and_mounts_its_certificates() {
    let calls = code::api_calls();
    // Allocation is the transport's job; through the allocator service it
    // is an HTTPS call, not a Kubernetes one.
    let allocation = code::calls_in(&calls, TRANSPORT);
    assert!(
        !allocation.is_empty(),
        "{TRANSPORT} allocates through the Kubernetes API"
    );
    let needed = code::needed_except(&calls, &[TRANSPORT, SHARED_WATCH]);
    let overlay = allocator_overlay();
    assert_eq!(
        role_permissions(overlay.role()),
        needed,
        "the overlay's Role must be the base's without {}",
        describe(&allocation)
    );

    let agones = &overlay.config.backend.agones;
    assert!(agones.allocator_ca_file.is_some(), "TLS: the allocator's CA");
    assert!(
        agones.allocator_client_cert_file.is_some() && agones.allocator_client_key_file.is_some(),
        "mutual TLS: a client certificate and key"
    );
    let secrets: BTreeSet<(String, String)> = overlay
        .pod()
        .volumes
        .iter()
        .flatten()
        .flat_map(|v| v.projected.iter())
        .flat_map(|p| p.sources.iter().flatten())
        .flat_map(|s| s.secret.iter())
        .flat_map(|s| s.items.iter().flatten().map(move |i| (s.name.clone(), i.key.clone())))
        .collect();
    for expected in [
        ("allocator-client.default", "tls.crt"),
        ("allocator-client.default", "tls.key"),
        ("allocator-tls-ca", "tls-ca.crt"),
    ] {
        assert!(
            secrets.contains(&(expected.0.to_string(), expected.1.to_string())),
            "the overlay mounts {}/{} (Agones' own Secret layout)",
            expected.0,
            expected.1
        );
    }
}

#[test]
fn the_fleet_matches_the_routers_backend_config() {
    for (deploy, policy) in [
        (base(), "Buffer"),
        (allocator_overlay(), "Buffer"),
        (webhook_overlay(), "Webhook"),
    ] {
        let agones = &deploy.config.backend.agones;
        let fleet = deploy.fleet();
        let name = fleet.metadata.name.as_deref().unwrap();
        assert_eq!(
            name,
            agones.fleet(),
            "{}: backend.agones.fleet names the Fleet",
            deploy.dir
        );
        assert_eq!(
            deploy.namespace_of("Fleet", name),
            agones.namespace,
            "{}: backend.agones.namespace is the Fleet's",
            deploy.dir
        );
        assert_eq!(
            deploy.namespace_of("Role", deploy.role().metadata.name.as_deref().unwrap()),
            agones.namespace,
            "{}: the Role must be where the GameServers are",
            deploy.dir
        );
        assert_eq!(fleet.spec.scheduling.as_deref().unwrap_or("Packed"), agones.scheduling);

        let gs = &fleet.spec.template.spec;
        let pod = gs.template.spec.as_ref().expect("the GameServer pod spec");
        let containers: BTreeSet<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        if let Some(sdk) = &gs.container {
            assert!(containers.contains(sdk.as_str()), "spec.container {sdk} is a container");
        }
        let port = gs
            .ports
            .iter()
            .find(|p| p.name == agones.port_name)
            .unwrap_or_else(|| panic!("{}: the Fleet has no port named {:?}", deploy.dir, agones.port_name));
        let port_container = port.container.as_deref().or(gs.container.as_deref()).unwrap();
        assert!(
            containers.contains(port_container),
            "port {} belongs to a container",
            port.name
        );
        assert_ne!(
            port.port_policy.as_deref(),
            Some("Passthrough"),
            "PodIP routing needs the containerPort to be where the WebUI listens"
        );

        let autoscaler = one(&deploy.bundle.autoscalers, "FleetAutoscaler");
        assert_eq!(
            autoscaler.spec.fleet_name, name,
            "the FleetAutoscaler scales this Fleet"
        );
        assert_eq!(autoscaler.spec.policy.kind, policy, "{}", deploy.dir);
        assert!(
            fleet.spec.replicas.is_none(),
            "the FleetAutoscaler owns replicas; a value here is reset on every apply"
        );
    }
}

#[test]
fn webui_pods_accept_traffic_only_from_the_router_on_the_webui_port() {
    let deploy = base();
    let policy = one(&deploy.bundle.network_policies, "NetworkPolicy");
    let spec = policy.spec.as_ref().unwrap();
    let webui_pods = fleet_pod_labels(deploy.fleet());
    let router_pods = deploy.pod_labels();
    assert!(
        selects(&spec.pod_selector.clone().unwrap_or_default(), &webui_pods),
        "applies to WebUI pods"
    );
    assert!(!selects(&spec.pod_selector.clone().unwrap_or_default(), &router_pods));
    assert!(spec.policy_types.iter().flatten().any(|t| t == "Ingress"));
    assert_eq!(
        deploy.namespace_of("NetworkPolicy", policy.metadata.name.as_deref().unwrap()),
        deploy.config.backend.agones.namespace
    );
    let rule = one(spec.ingress.as_deref().unwrap_or_default(), "ingress rule");
    let peer = one(rule.from.as_deref().unwrap_or_default(), "ingress peer");
    assert!(peer.ip_block.is_none(), "no address ranges: only the router");
    assert!(peer.namespace_selector.is_none(), "the router's own namespace only");
    let from = peer.pod_selector.as_ref().expect("a pod selector");
    assert!(selects(from, &router_pods), "admits the router");
    assert!(!selects(from, &webui_pods), "does not admit WebUI pods");
    let port = one(rule.ports.as_deref().unwrap_or_default(), "allowed port");
    let fleet_port = deploy
        .fleet()
        .spec
        .template
        .spec
        .ports
        .iter()
        .find(|p| p.name == deploy.config.backend.agones.port_name)
        .unwrap();
    assert_eq!(port.port, Some(IntOrString::Int(fleet_port.container_port)));
    assert_eq!(port.protocol.as_deref().unwrap_or("TCP"), "TCP");
}

#[test]
fn the_webhook_overlay_points_the_fleet_autoscaler_at_the_routers_autoscaler_listener() {
    let deploy = webhook_overlay();
    let listen = deploy
        .config
        .server
        .autoscaler_listen
        .expect("server.autoscaler_listen is set");
    assert!(listen.ip().is_unspecified(), "listen on all interfaces in a pod");
    let router = deploy.router();
    assert_eq!(
        container_port(router, "autoscaler") as u16,
        listen.port(),
        "the autoscaler containerPort is server.autoscaler_listen's port"
    );

    let autoscaler = one(&deploy.bundle.autoscalers, "FleetAutoscaler");
    assert!(
        autoscaler.spec.policy.buffer.is_none(),
        "no Buffer settings left behind"
    );
    assert!(autoscaler.spec.sync.is_some(), "the base's sync period is kept");
    let webhook = autoscaler.spec.policy.webhook.as_ref().expect("webhook settings");
    assert!(webhook.url.is_none(), "through the Service, not a URL");
    let target = webhook.service.as_ref().expect("webhook.service");
    let service = deploy
        .bundle
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(target.name.as_str()))
        .unwrap_or_else(|| panic!("webhook.service names Service {}, which is not rendered", target.name));
    assert_eq!(
        target.namespace,
        deploy.namespace_of("Service", &target.name),
        "webhook.service.namespace is the Service's (kustomize does not rewrite it)"
    );
    assert!(
        target.path.as_deref().is_some_and(|p| p.starts_with('/')),
        "a path starting with '/'"
    );
    let port = target.port.unwrap_or(8000);
    let ports = service
        .spec
        .as_ref()
        .and_then(|s| s.ports.as_deref())
        .unwrap_or_default();
    let service_port = ports
        .iter()
        .find(|p| p.port == port)
        .unwrap_or_else(|| panic!("Service {} has no port {port}", target.name));
    assert_eq!(
        service_target(service_port, router) as u16,
        listen.port(),
        "Service port {port} forwards to server.autoscaler_listen"
    );
    let ingress_port = one(&deploy.bundle.ingresses, "Ingress")
        .spec
        .as_ref()
        .and_then(|s| s.default_backend.as_ref())
        .and_then(|d| d.service.as_ref())
        .and_then(|s| s.port.as_ref())
        .and_then(|p| p.number);
    assert_ne!(ingress_port, Some(port), "the load balancer never reaches the webhook");

    // The webhook keeps the bounds of the Buffer policy it replaces.
    let base = base();
    let buffer = one(&base.bundle.autoscalers, "FleetAutoscaler")
        .spec
        .policy
        .buffer
        .as_ref()
        .expect("the base's Buffer policy");
    let limits = &deploy.config.autoscaler;
    assert_eq!(
        buffer.buffer_size,
        IntOrString::Int(limits.buffer as i32),
        "autoscaler.buffer"
    );
    assert_eq!(
        buffer.min_replicas.unwrap_or(0),
        limits.min_replicas as i32,
        "autoscaler.min_replicas"
    );
    assert_eq!(
        buffer.max_replicas, limits.max_replicas as i32,
        "autoscaler.max_replicas"
    );
}

#[test]
fn only_the_agones_controller_may_call_the_webhook_and_the_routers_other_ports_stay_open() {
    let deploy = webhook_overlay();
    let router_pods = deploy.pod_labels();
    let router = deploy.router();
    let on_router: Vec<_> = deploy
        .bundle
        .network_policies
        .iter()
        .filter(|p| {
            selects(
                &p.spec.as_ref().unwrap().pod_selector.clone().unwrap_or_default(),
                &router_pods,
            )
        })
        .collect();
    let policy = one(&on_router, "NetworkPolicy on the router's pods");
    let name = policy.metadata.name.as_deref().unwrap();
    assert_eq!(
        deploy.namespace_of("NetworkPolicy", name),
        deploy.namespace_of("Deployment", deploy.deployment().metadata.name.as_deref().unwrap()),
        "in the router's namespace"
    );
    let spec = policy.spec.as_ref().unwrap();
    assert!(spec.policy_types.iter().flatten().any(|t| t == "Ingress"));
    let rules = spec.ingress.as_deref().unwrap_or_default();
    let webhook = container_port(router, "autoscaler");
    let label = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    for port in router.ports.iter().flatten() {
        let port_name = port.name.as_deref().unwrap_or("?");
        let admitting: Vec<_> = rules
            .iter()
            .filter(|r| {
                r.ports.as_ref().is_none_or(|ports| {
                    ports.iter().any(|p| {
                        let number = match &p.port {
                            Some(IntOrString::String(name)) => container_port(router, name),
                            Some(IntOrString::Int(n)) => *n,
                            None => port.container_port,
                        };
                        number == port.container_port && p.protocol.as_deref().unwrap_or("TCP") == "TCP"
                    })
                })
            })
            .collect();
        assert!(!admitting.is_empty(), "{name} closes the router's {port_name} port");
        if port.container_port != webhook {
            assert!(
                admitting.iter().any(|r| r.from.as_ref().is_none_or(|f| f.is_empty())),
                "{port_name} stays open to all, as without {name}"
            );
            continue;
        }
        for rule in admitting {
            let peer = one(rule.from.as_deref().unwrap_or_default(), "webhook peer");
            assert!(peer.ip_block.is_none(), "no address ranges: only the Agones controller");
            let namespaces = peer.namespace_selector.as_ref().expect("a namespace selector");
            let namespace = |n: &str| label("kubernetes.io/metadata.name", n);
            assert!(selects(namespaces, &namespace("agones-system")), "Agones' namespace");
            assert!(!selects(namespaces, &namespace("default")));
            let pods = peer.pod_selector.as_ref().expect("a pod selector: the controller only");
            let mut controller = label("agones.dev/role", "controller");
            controller.insert("app".into(), "agones".into());
            assert!(selects(pods, &controller), "the agones-controller pods");
            assert!(
                !selects(pods, &label("agones.dev/role", "allocator")),
                "not the allocator"
            );
        }
    }
    let base = base();
    let base_router = base.pod_labels();
    assert!(
        base.bundle.network_policies.iter().all(|p| !selects(
            &p.spec.as_ref().unwrap().pod_selector.clone().unwrap_or_default(),
            &base_router
        )),
        "without the overlay no policy applies to the router (its ports are open as before)"
    );
}

#[test]
fn the_dockerfile_keeps_its_invariants() {
    let stages = dockerfile::parse(&read("Dockerfile"));
    assert!(
        stages.len() >= 2,
        "multi-stage: a build stage and a minimal runtime stage"
    );
    let names: BTreeSet<&str> = stages.iter().filter_map(|s| s.name.as_deref()).collect();
    for stage in &stages {
        if names.contains(stage.image.as_str()) {
            continue;
        }
        let (repository, tag, digest) = dockerfile::image_parts(&stage.image);
        assert!(
            tag.is_some() || digest.is_some(),
            "{} is not pinned: name an exact tag or a digest",
            stage.image
        );
        assert_ne!(tag.as_deref(), Some("latest"), "{repository}:latest is not a pin");
        for instruction in stage.all("ENV").chain(stage.all("ARG")) {
            let upper = instruction.args.to_ascii_uppercase();
            for word in ["SECRET", "TOKEN", "PASSWORD", "CREDENTIAL", "PRIVATE", "_KEY"] {
                assert!(
                    !upper.contains(word),
                    "no secret in the image: {} {}",
                    instruction.keyword,
                    instruction.args
                );
            }
        }
        for instruction in stage.all("COPY").chain(stage.all("ADD")) {
            for bad in [".env", ".pem", ".key", "secret", "credentials"] {
                assert!(!instruction.args.contains(bad), "copies {bad}: {}", instruction.args);
            }
        }
        assert!(
            stage.all("ADD").next().is_none(),
            "COPY, not ADD (no remote fetches or auto-extraction)"
        );
    }

    let build = &stages[0];
    let rust_version = dockerfile::image_parts(&build.image).1.unwrap();
    let toolchain: Vec<u32> = rust_version
        .split('-')
        .next()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    let manifest: toml::Table = read("Cargo.toml").parse().unwrap();
    let msrv: Vec<u32> = manifest["package"]["rust-version"]
        .as_str()
        .unwrap()
        .split('.')
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(
        toolchain >= msrv,
        "the builder's Rust {rust_version} is older than rust-version"
    );
    assert!(
        build
            .all("RUN")
            .any(|r| r.args.contains("cargo build --release --locked")),
        "the build stage runs the same command as a native release build"
    );

    let runtime = stages.last().unwrap();
    assert!(
        runtime.image.starts_with("gcr.io/distroless/") || runtime.image == "scratch",
        "the runtime image is minimal (distroless or scratch), not {}",
        runtime.image
    );
    assert!(
        runtime.all("RUN").next().is_none(),
        "the runtime stage has no shell to RUN anything"
    );
    let user = runtime
        .all("USER")
        .last()
        .expect("a USER in the runtime stage")
        .args
        .clone();
    let uid: u32 = user
        .split(':')
        .next()
        .unwrap()
        .parse()
        .unwrap_or_else(|_| panic!("USER {user} must be numeric (runAsNonRoot verifies numbers)"));
    assert_ne!(uid, 0, "USER must not be root");

    let entrypoint = runtime.all("ENTRYPOINT").last().expect("an ENTRYPOINT");
    let argv: Vec<String> = serde_json::from_str(&entrypoint.args).expect("ENTRYPOINT in exec (JSON array) form");
    assert_eq!(
        argv[1..],
        ["serve", "--config", CONFIG_PATH],
        "ENTRYPOINT runs serve with the mounted config"
    );
    let copies_binary = runtime
        .all("COPY")
        .any(|c| c.args.starts_with("--from=") && c.args.split_whitespace().last() == Some(argv[0].as_str()));
    assert!(
        copies_binary,
        "the runtime stage copies the built binary to {}",
        argv[0]
    );
    assert!(
        runtime.all("CMD").next().is_none(),
        "arguments come from the Deployment, not CMD"
    );
}

#[test]
fn the_image_and_the_deployment_agree() {
    let stages = dockerfile::parse(&read("Dockerfile"));
    let runtime = stages.last().unwrap();
    let user = &runtime.all("USER").last().unwrap().args;
    let (uid, gid) = user.split_once(':').unwrap_or((user, user));
    let deploy = base();
    let psc = deploy.pod().security_context.clone().unwrap();
    assert_eq!(psc.run_as_user.map(|u| u.to_string()).as_deref(), Some(uid));
    assert_eq!(psc.run_as_group.map(|g| g.to_string()).as_deref(), Some(gid));
    let exposed: BTreeSet<i32> = runtime
        .all("EXPOSE")
        .flat_map(|e| e.args.split_whitespace())
        .map(|p| p.split('/').next().unwrap().parse().unwrap())
        .collect();
    assert!(
        exposed.contains(&container_port(deploy.router(), "http")),
        "EXPOSE the router's port"
    );
    let args = deploy.router().args.clone().unwrap_or_default();
    assert!(
        !args.iter().any(|a| a == "serve" || a == "--config"),
        "the Deployment appends flags to the ENTRYPOINT; it must not repeat serve/--config: {args:?}"
    );
}

#[test]
fn dockerignore_keeps_build_output_vcs_and_secrets_out() {
    let ignore = read(".dockerignore");
    let patterns: BTreeSet<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    for required in ["target/", ".git/", ".env", "**/*.pem", "**/*.key"] {
        assert!(patterns.contains(required), ".dockerignore must exclude {required}");
    }
    // Nothing the build needs may be excluded: the manifest, the lock file
    // and every target source the manifest names.
    let manifest = read("Cargo.toml");
    let mut needed = vec!["Cargo.toml".to_string(), "Cargo.lock".to_string(), "src".to_string()];
    for line in manifest.lines() {
        if let Some(path) = line.trim().strip_prefix("path = \"").and_then(|p| p.strip_suffix('"')) {
            needed.push(path.split('/').next().unwrap().to_string());
        }
    }
    for path in needed {
        for pattern in &patterns {
            let bare = pattern.trim_end_matches('/');
            assert!(
                bare != path && bare != format!("{path}/**"),
                ".dockerignore excludes {path}, which the build needs"
            );
        }
    }
}

#[test]
fn no_secret_is_committed_and_the_guide_creates_the_ones_referenced() {
    let guide = read("DEPLOY.md");
    for deploy in [base(), allocator_overlay(), webhook_overlay()] {
        for o in &deploy.rendered.objects {
            assert_ne!(
                o.kind(),
                "Secret",
                "{}: Secrets are created by hand, never committed",
                o.source
            );
        }
        let router = deploy.router();
        for env in router.env.iter().flatten() {
            if let Some(secret) = env.value_from.as_ref().and_then(|v| v.secret_key_ref.as_ref()) {
                let command = format!("kubectl create secret generic {}", secret.name);
                assert!(guide.contains(&command), "DEPLOY.md must show `{command}`");
                assert!(
                    guide.contains(&format!("--from-literal={}=", secret.key)),
                    "DEPLOY.md must create key {} in {}",
                    secret.key,
                    secret.name
                );
            }
        }
        assert!(
            router
                .env
                .iter()
                .flatten()
                .any(|e| e.name == "SESSION_ROUTER_COOKIE_SECRET"
                    && e.value_from.as_ref().is_some_and(|v| v.secret_key_ref.is_some())),
            "the cookie secret comes from a Secret"
        );
        let iap = one(&deploy.bundle.backend_configs, "BackendConfig")
            .spec
            .iap
            .as_ref()
            .unwrap();
        if let Some(credentials) = &iap.oauthclient_credentials {
            let command = format!("kubectl create secret generic {}", credentials.secret_name);
            assert!(guide.contains(&command), "DEPLOY.md must show `{command}`");
        }
        for volume in deploy.pod().volumes.iter().flatten() {
            for source in volume.projected.iter().flat_map(|p| p.sources.iter().flatten()) {
                if let Some(secret) = &source.secret {
                    assert!(
                        guide.contains(&secret.name),
                        "DEPLOY.md must say where {} comes from",
                        secret.name
                    );
                }
            }
        }
    }
}

/// Where kubectl is installed, the real kustomize must render exactly what
/// the other tests checked (ConfigMap names aside: kustomize appends a hash).
/// The model Deployment of the shared-model overlay: the one that is not
/// the router.
fn model_deployment(deploy: &Deploy) -> &Deployment {
    let models: Vec<&Deployment> = deploy
        .bundle
        .deployments
        .iter()
        .filter(|d| d.metadata.name.as_deref() != Some(ROUTER_CONTAINER))
        .collect();
    match models[..] {
        [model] => model,
        _ => panic!(
            "expected one model Deployment in the shared-model overlay, found {}",
            models.len()
        ),
    }
}

#[test]
fn the_shared_model_overlay_grants_the_endpoint_watch_and_nothing_else() {
    let calls = code::api_calls();
    let watch = code::calls_in(&calls, SHARED_WATCH);
    let expected: BTreeSet<code::Permission> = ["list", "watch"]
        .iter()
        .map(|verb| ("discovery.k8s.io".into(), "endpointslices".into(), verb.to_string()))
        .collect();
    assert_eq!(watch, expected, "{SHARED_WATCH} lists and watches EndpointSlices");
    let overlay = role_permissions(shared_overlay().role());
    let base = role_permissions(base().role());
    let added: BTreeSet<_> = overlay.difference(&base).cloned().collect();
    assert_eq!(describe(&added), describe(&expected), "what the overlay's Role adds");
    assert!(base.is_subset(&overlay), "the overlay keeps the base's rules");
    let all: BTreeSet<_> = calls.keys().cloned().collect();
    assert_eq!(overlay, all, "the overlay's Role grants exactly what the code uses");
}

#[test]
fn the_shared_model_overlay_points_the_router_at_a_model_deployment_its_service_and_an_hpa() {
    let overlay = shared_overlay();
    let without_backend = |generated: &BTreeMap<String, BTreeMap<String, PathBuf>>| -> toml::Table {
        let file = &generated["session-router-config"]["config.toml"];
        let mut t: toml::Table = std::fs::read_to_string(file).unwrap().parse().unwrap();
        t.remove("backend");
        t.remove("profiles");
        t
    };
    assert_eq!(
        without_backend(&base().rendered.generated),
        without_backend(&overlay.rendered.generated),
        "k8s/overlays/shared-model/config.toml must equal k8s/router/config.toml except [backend] / [[profiles]]"
    );
    // Both designs behind the one router: the default profile is the base's
    // dedicated Fleet, another profile shares the model's replicas.
    let profiles = &overlay.config.profiles;
    let dedicated = profiles.iter().find(|p| p.default).expect("a default profile");
    let base_agones = serde_json::to_value(&base().config.backend.agones).unwrap();
    assert_eq!(dedicated.backend.kind, BackendKind::Agones);
    assert_eq!(
        serde_json::to_value(&dedicated.backend.agones).unwrap(),
        base_agones,
        "the dedicated profile is the base's [backend.agones]"
    );
    let shared_profile = profiles
        .iter()
        .find(|p| p.backend.kind == BackendKind::Shared)
        .expect("a profile of kind shared");
    let shared = &shared_profile.backend.shared;

    // The config names the Service, in its namespace, by a port it has.
    let service_name = shared.service.as_deref().expect("backend.shared.service");
    let service = overlay
        .bundle
        .services
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some(service_name))
        .unwrap_or_else(|| panic!("no Service {service_name} rendered"));
    assert_eq!(
        shared.namespace.as_deref(),
        Some(overlay.namespace_of("Service", service_name).as_str()),
        "backend.shared.namespace is the Service's"
    );
    let port_name = shared.port_name.as_deref().expect("backend.shared.port_name");
    let spec = service.spec.as_ref().unwrap();
    let port = spec
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(port_name))
        .unwrap_or_else(|| panic!("Service {service_name} has no port {port_name}"));
    assert_eq!(
        overlay.namespace_of("Role", "session-router"),
        overlay.namespace_of("Service", service_name),
        "the Role reaches the Service's EndpointSlices"
    );

    // The Service selects the model's pods and reaches the WebUI.
    let model = model_deployment(&overlay);
    let name = model.metadata.name.clone().unwrap();
    let labels = template_labels(model);
    let selector = spec.selector.clone().unwrap_or_default();
    assert!(
        selects(&map_selector(&selector), &labels),
        "Service {service_name} selects {name}'s pods"
    );
    assert!(
        selects(&model.spec.as_ref().unwrap().selector, &labels),
        "{name} selects its own pods"
    );
    let pod = pod_spec(model);
    let webui = container(pod, "stable-diffusion-webui");
    assert_eq!(service_target(port, webui), 7860, "the WebUI's port");
    assert!(
        webui.readiness_probe.is_some(),
        "only a WebUI that answers is an endpoint"
    );
    assert!(
        model.spec.as_ref().unwrap().replicas.is_none(),
        "the HPA owns the replica count"
    );

    // The original's shape: the Fleet's image, one GPU, the model folder
    // from the Fleet's shared volume.
    let base = base();
    let fleet_pod = base.fleet().spec.template.spec.template.spec.as_ref().unwrap();
    let fleet_webui = container(fleet_pod, "stable-diffusion-webui");
    assert_eq!(webui.image, fleet_webui.image, "the same WebUI image as the Fleet");
    let gpus = webui
        .resources
        .as_ref()
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("nvidia.com/gpu"));
    assert_eq!(gpus.map(|q| q.0.as_str()), Some("1"), "one GPU a replica");
    let claim = |pod: &PodSpec, c: &Container, path: &str| -> Option<(String, Option<String>)> {
        let mount = c.volume_mounts.iter().flatten().find(|m| m.mount_path == path)?;
        let pvc = volume(pod, &mount.name).persistent_volume_claim.as_ref()?;
        Some((pvc.claim_name.clone(), mount.sub_path.clone()))
    };
    let (fleet_claim, _) = claim(fleet_pod, fleet_webui, "/sd_dir").expect("the Fleet mounts the shared volume");
    let (model_claim, folder) = claim(pod, webui, "/stable-diffusion-webui/models/Stable-diffusion")
        .expect("the model folder is mounted where the WebUI reads checkpoints");
    assert_eq!(model_claim, fleet_claim, "from the Fleet's shared volume");
    assert!(
        folder.is_some_and(|f| !f.is_empty()),
        "only the model's folder (a subPath)"
    );

    // An HPA scales the model Deployment.
    let hpa = one(&overlay.bundle.horizontal_autoscalers, "HorizontalPodAutoscaler");
    let hpa_spec = hpa.spec.as_ref().unwrap();
    let target = &hpa_spec.scale_target_ref;
    assert_eq!(
        (
            target.api_version.as_deref(),
            target.kind.as_str(),
            target.name.as_str()
        ),
        (Some("apps/v1"), "Deployment", name.as_str())
    );
    assert!(hpa_spec.min_replicas.unwrap_or(1) >= 1 && hpa_spec.max_replicas >= hpa_spec.min_replicas.unwrap_or(1));
    let cpu_metric = hpa_spec
        .metrics
        .iter()
        .flatten()
        .any(|m| m.resource.as_ref().is_some_and(|r| r.name == "cpu"));
    let cpu_requested = webui
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref())
        .is_some_and(|r| r.contains_key("cpu"));
    assert!(
        !cpu_metric || cpu_requested,
        "a CPU-utilization HPA needs a CPU request"
    );

    // Only the router reaches the model's pods.
    let policy = overlay
        .bundle
        .network_policies
        .iter()
        .find(|p| {
            selects(
                &p.spec.as_ref().unwrap().pod_selector.clone().unwrap_or_default(),
                &labels,
            )
        })
        .expect("a NetworkPolicy selects the model's pods");
    let ingress = policy.spec.as_ref().unwrap().ingress.clone().unwrap_or_default();
    assert!(
        ingress.iter().all(|rule| rule.from.iter().flatten().all(|peer| peer
            .pod_selector
            .as_ref()
            .is_some_and(|s| selects(s, &overlay.pod_labels())))),
        "only the router's pods may connect"
    );
}

#[test]
fn kubectl_kustomize_renders_what_the_tests_check() {
    let Ok(version) = std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .output()
    else {
        eprintln!("kubectl not installed: the kustomize model is not cross-checked");
        return;
    };
    assert!(version.status.success());
    for dir in [
        "k8s",
        "k8s/overlays/agones-allocator",
        "k8s/overlays/webhook-autoscaler",
        "k8s/overlays/shared-model",
    ] {
        let out = std::process::Command::new("kubectl")
            .args(["kustomize", dir])
            .current_dir(root())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kubectl kustomize {dir}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let real = kustomize::yaml_documents(&String::from_utf8(out.stdout).unwrap(), dir);
        let modelled = kustomize::build(&root().join(dir));
        let generated: Vec<String> = modelled.generated.keys().cloned().collect();
        let key = |v: &Value| {
            format!(
                "{}/{}",
                v["kind"].as_str().unwrap(),
                v["metadata"]["name"].as_str().unwrap()
            )
        };
        let unhash = |v: Value| -> Value {
            let mut text = v.to_string();
            for name in &generated {
                // `name-<10 chars>` → `name`, wherever it is referenced.
                while let Some(at) = text.find(&format!("\"{name}-")) {
                    let start = at + 1 + name.len();
                    let end = text[start..].find('"').map(|e| start + e).unwrap();
                    text.replace_range(start..end, "");
                }
            }
            serde_json::from_str(&text).unwrap()
        };
        let real: BTreeMap<String, Value> = real.into_iter().map(unhash).map(|v| (key(&v), v)).collect();
        let modelled: BTreeMap<String, Value> =
            modelled.objects.into_iter().map(|o| (key(&o.value), o.value)).collect();
        assert_eq!(
            real.keys().collect::<Vec<_>>(),
            modelled.keys().collect::<Vec<_>>(),
            "{dir}: the same objects"
        );
        for (k, v) in &real {
            assert_eq!(
                v, &modelled[k],
                "{dir}: {k} differs between kubectl kustomize and the model"
            );
        }
    }
}

#[test]
fn metrics_are_scraped_from_the_pods_and_never_exposed_through_the_service() {
    for deploy in [base(), allocator_overlay(), webhook_overlay()] {
        let monitoring = one(&deploy.bundle.pod_monitorings, "PodMonitoring");
        let deployment = one(&deploy.bundle.deployments, "Deployment");
        assert!(
            selects(&monitoring.spec.selector, &template_labels(deployment)),
            "{}: the PodMonitoring must select the router's pods",
            deploy.dir
        );
        let endpoint = &monitoring.spec.endpoints[0];
        assert_eq!(endpoint.path, "/metrics");
        let port = container_port(deploy.router(), &endpoint.port);
        assert_eq!(
            Some(port as u16),
            deploy.config.server.metrics_listen.map(|a| a.port()),
            "{}: scrape the metrics_listen port",
            deploy.dir
        );
        for service in &deploy.bundle.services {
            for service_port in service.spec.iter().flat_map(|s| s.ports.iter().flatten()) {
                let target = match &service_port.target_port {
                    Some(IntOrString::String(name)) => container_port(deploy.router(), name),
                    Some(IntOrString::Int(n)) => *n,
                    None => service_port.port,
                };
                assert_ne!(target, port, "{}: a Service exposes the metrics port", deploy.dir);
            }
        }
    }
}

#[test]
fn the_dashboard_queries_only_metrics_the_router_exports() {
    let dashboard: serde_json::Value = serde_json::from_str(&read("k8s/router/grafana-dashboard.json")).unwrap();
    let exported = session_router::metrics::Metrics::new().render();
    let mut names: BTreeSet<String> = exported
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect();
    // Histograms expose these series too.
    for histogram in names.clone().iter().filter(|n| n.ends_with("_seconds")) {
        for suffix in ["_bucket", "_count", "_sum"] {
            names.insert(format!("{histogram}{suffix}"));
        }
    }
    let panels = dashboard["panels"].as_array().expect("panels");
    let titles: Vec<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    for wanted in [
        "Sessions",
        "waiting",
        "Allocation latency",
        "Request rate",
        "Releases by reason",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(wanted)),
            "no panel about {wanted}: {titles:?}"
        );
    }
    for panel in panels {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            let used: Vec<&str> = expr
                .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|t| t.starts_with("session_router_"))
                .collect();
            assert!(!used.is_empty(), "{expr} queries no router metric");
            for name in used {
                assert!(
                    names.contains(name),
                    "the dashboard queries {name}, which the router does not export"
                );
            }
        }
    }
}
