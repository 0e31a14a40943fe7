//! The Kubernetes manifests stay consistent with the service and with the configuration keys:
//! the StatefulSet's `MESH_*` variables, with the pod fields Kubernetes substitutes, must make
//! a valid configuration that discovers peers through the headless service.

use mesh::{DiscoveryMode, MeshConfig};
use serde_yaml_ng::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/deploy/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_yaml_ng::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |v, key| &v[*key])
}

#[test]
fn the_service_is_headless_and_publishes_pods_before_they_are_ready() {
    let service = load("service.yaml");
    assert_eq!(at(&service, &["spec", "clusterIP"]).as_str(), Some("None"));
    assert_eq!(
        at(&service, &["spec", "publishNotReadyAddresses"]).as_bool(),
        Some(true)
    );
    let ports = at(&service, &["spec", "ports"]).as_sequence().unwrap();
    let has = |name: &str, port: u64, protocol: &str| {
        ports.iter().any(|p| {
            p["name"].as_str() == Some(name)
                && p["port"].as_u64() == Some(port)
                && p["protocol"].as_str() == Some(protocol)
        })
    };
    assert!(has("gossip", 7946, "UDP"));
    assert!(has("gossip-tcp", 7946, "TCP"));
    assert!(has("grpc", 50051, "TCP"));
}

#[test]
fn the_statefulset_wires_pod_name_and_ip_into_a_valid_dns_configuration() {
    let service = load("service.yaml");
    let set = load("statefulset.yaml");
    assert_eq!(
        at(&set, &["spec", "serviceName"]).as_str(),
        at(&service, &["metadata", "name"]).as_str()
    );
    let container = &at(&set, &["spec", "template", "spec", "containers"])[0];
    // Every port the service targets exists on the container.
    let container_ports: Vec<&str> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["name"].as_str())
        .collect();
    for port in at(&service, &["spec", "ports"]).as_sequence().unwrap() {
        let target = port["targetPort"].as_str().unwrap();
        assert!(
            container_ports.contains(&target),
            "missing container port {target}"
        );
    }

    // What Kubernetes substitutes for $(POD_NAME) etc.
    let pod = [
        ("$(POD_NAME)", "mesh-2"),
        ("$(POD_IP)", "10.42.0.17"),
        ("$(POD_NAMESPACE)", "build"),
    ];
    let vars: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .filter(|(name, _)| name.starts_with("MESH_"))
        .map(|(name, value)| {
            let value = pod
                .iter()
                .fold(value, |v, (placeholder, real)| v.replace(placeholder, real));
            (name, value)
        })
        .collect();
    assert!(!vars.is_empty());
    let mut config = MeshConfig::default();
    config.apply_vars(vars).unwrap();
    assert_eq!(config.discovery_mode, DiscoveryMode::Dns);
    assert_eq!(config.dns_service_name, "mesh.build.svc.cluster.local.");
    let (_builder, resolved) = config.node_builder().unwrap();
    assert_eq!(resolved.node_id.as_str(), "mesh-2");

    // A service named `mesh` would give every pod MESH_SERVICE_HOST, MESH_PORT, … through
    // Kubernetes' service links, which the node refuses as unknown keys: links must be off.
    let service_name = at(&service, &["metadata", "name"]).as_str().unwrap();
    let link = format!("{}_SERVICE_HOST", service_name.to_ascii_uppercase());
    let refused = MeshConfig::default().apply_vars([(link.clone(), "10.43.0.10".to_owned())]);
    assert!(refused.is_err(), "{link} would be read as a mesh key");
    assert_eq!(
        at(&set, &["spec", "template", "spec", "enableServiceLinks"]).as_bool(),
        Some(false),
        "service links would inject {link} and the node would refuse to start"
    );
    assert_eq!(
        resolved.gossip_advertise,
        "10.42.0.17:7946".parse().unwrap()
    );
    assert_eq!(resolved.gossip_bind, "0.0.0.0:7946".parse().unwrap());
    assert_eq!(
        resolved.grpc_endpoint.as_deref(),
        Some("http://10.42.0.17:50051")
    );
}

#[test]
fn probes_ask_the_grpc_health_service_readiness_overall_and_liveness_of_the_admin_service() {
    let set = load("statefulset.yaml");
    let container = &at(&set, &["spec", "template", "spec", "containers"])[0];
    let port_number = |name: &str| {
        container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    let grpc_port = port_number("grpc");
    // The node serves gRPC on MESH_GRPC_PORT.
    let env_grpc_port = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|e| e["name"].as_str() == Some("MESH_GRPC_PORT"))
        .and_then(|e| e["value"].as_str())
        .unwrap();
    assert_eq!(env_grpc_port, grpc_port.to_string());

    let readiness = &container["readinessProbe"];
    assert!(
        readiness["tcpSocket"].is_null(),
        "a TCP probe only sees an open port"
    );
    assert_eq!(readiness["grpc"]["port"].as_u64(), Some(grpc_port));
    // No service: the overall status, which follows joining and draining.
    assert!(
        readiness["grpc"]["service"]
            .as_str()
            .is_none_or(str::is_empty)
    );

    let liveness = &container["livenessProbe"];
    assert_eq!(liveness["grpc"]["port"].as_u64(), Some(grpc_port));
    // Stays SERVING while draining: a draining node must not be restarted.
    assert_eq!(
        liveness["grpc"]["service"].as_str(),
        Some(mesh::health::LIVENESS_SERVICE)
    );
}

#[test]
fn the_metrics_endpoint_is_served_declared_and_announced_on_one_port() {
    let set = load("statefulset.yaml");
    let template = at(&set, &["spec", "template"]);
    let container = &template["spec"]["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at_flag = args
        .iter()
        .position(|a| *a == "--metrics-addr")
        .expect("the node serves metrics");
    let addr: std::net::SocketAddr = args[at_flag + 1].parse().unwrap();
    assert!(addr.ip().is_unspecified(), "reachable from outside the pod");
    let declared = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["name"].as_str() == Some("metrics"))
        .and_then(|p| p["containerPort"].as_u64());
    assert_eq!(declared, Some(u64::from(addr.port())));
    let annotations = &template["metadata"]["annotations"];
    assert_eq!(
        annotations["prometheus.io/port"].as_str(),
        Some(addr.port().to_string().as_str())
    );
    assert_eq!(annotations["prometheus.io/path"].as_str(), Some("/metrics"));
}

/// The drain fits in the pod's termination grace period: preStop, then the node's drain
/// grace, then its leave, all before the kubelet's SIGKILL.
#[test]
fn the_drain_grace_and_prestop_fit_inside_the_pods_grace_period() {
    let set = load("statefulset.yaml");
    let pod = at(&set, &["spec", "template", "spec"]);
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let at_flag = args
        .iter()
        .position(|a| *a == "--drain-grace")
        .expect("the node's drain grace is set");
    let drain = humantime::parse_duration(args[at_flag + 1]).unwrap();
    let pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop sleep");
    let pod_grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    // The leave (the lan preset's leave timeout) and the process exit need a few seconds.
    let leave = 5;
    assert!(
        pre_stop + drain.as_secs() + leave <= pod_grace,
        "preStop {pre_stop} s + drain {drain:?} + leave {leave} s exceed the pod's {pod_grace} s"
    );
    assert!(drain < mesh::drain::DEFAULT_GRACE + std::time::Duration::from_secs(1));
}

/// Every document of a multi-document manifest.
fn load_all(name: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    let path = format!("{}/deploy/k8s/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|document| Value::deserialize(document).unwrap())
        .collect()
}

/// The REAPI manifests (`deploy/k8s/reapi/`) hold together with the binary and the keys: the
/// ConfigMap's file is a valid configuration in both sections with the pod's variables over it,
/// its data directory is the volume each pod claims, the container's flags are `mesh-node`'s,
/// the probes and services use the configured gRPC port, and Bazel's service reaches the
/// replicas.
#[test]
fn the_reapi_manifests_match_the_binarys_flags_and_the_configuration_keys() {
    use mesh_reapi::ReapiSettings;

    let config_map = load("reapi/configmap.yaml");
    let set = load("reapi/statefulset.yaml");
    let services = load_all("reapi/service.yaml");
    let pod = at(&set, &["spec", "template", "spec"]);
    let container = &pod["containers"][0];
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();

    // Every flag is one mesh-node has (its --help lists it).
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_mesh-node"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    for flag in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            help.contains(&format!("{flag} ")),
            "mesh-node has no {flag}"
        );
    }
    let flag = |name: &str| {
        let i = args.iter().position(|a| *a == name).unwrap();
        args[i + 1]
    };
    assert_eq!(flag("--api"), "reapi");

    // The file the ConfigMap mounts where --config points.
    let config_path = std::path::Path::new(flag("--config"));
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount_of = |volume: &str| {
        mounts
            .iter()
            .find(|m| m["name"].as_str() == Some(volume))
            .and_then(|m| m["mountPath"].as_str())
            .unwrap_or_else(|| panic!("no mount of volume {volume}"))
    };
    let config_volume = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|v| v["configMap"]["name"] == config_map["metadata"]["name"])
        .expect("the ConfigMap is a volume");
    assert_eq!(
        std::path::Path::new(mount_of(config_volume["name"].as_str().unwrap())),
        config_path.parent().unwrap()
    );
    let file_name = config_path.file_name().unwrap().to_str().unwrap();
    let text = config_map["data"][file_name]
        .as_str()
        .unwrap_or_else(|| panic!("the ConfigMap has no {file_name}"));

    // The pod's variables over the file, as mesh-node applies them.
    let pod_fields = [
        ("$(POD_NAME)", "reapi-1"),
        ("$(POD_IP)", "10.42.0.18"),
        ("$(POD_NAMESPACE)", "build"),
    ];
    let vars: Vec<(String, String)> = container["env"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?, e["value"].as_str()?)))
        .filter(|(name, _)| name.starts_with("MESH_"))
        .map(|(name, value)| {
            let value = pod_fields
                .iter()
                .fold(value.to_owned(), |v, (field, real)| v.replace(field, real));
            (name.to_owned(), value)
        })
        .collect();
    let mut mesh = MeshConfig::from_toml_str(text).unwrap();
    mesh.apply_vars(vars.clone()).unwrap();
    let mut reapi: ReapiSettings = mesh::config::from_toml_str(text).unwrap();
    mesh::config::apply_vars(&mut reapi, vars).unwrap();
    let (_builder, resolved) = mesh.node_builder().unwrap();
    assert_eq!(resolved.node_id.as_str(), "reapi-1");
    assert_eq!(mesh.discovery_mode, DiscoveryMode::Dns);
    let headless = services
        .iter()
        .find(|s| s["spec"]["clusterIP"].as_str() == Some("None"))
        .expect("a headless service");
    let headless_name = headless["metadata"]["name"].as_str().unwrap();
    assert_eq!(
        mesh.dns_service_name,
        format!("{headless_name}.build.svc.cluster.local.")
    );
    assert_eq!(
        at(&set, &["spec", "serviceName"]).as_str(),
        Some(headless_name)
    );
    let made = reapi
        .reapi_config("reapi-1", Some(mesh.max_concurrency))
        .unwrap();

    // The data directory is the pod's own volume, large enough for the CAS bound.
    let claim = &at(&set, &["spec", "volumeClaimTemplates"])[0];
    let data_mount = mount_of(claim["metadata"]["name"].as_str().unwrap());
    assert_eq!(made.data_dir, std::path::Path::new(data_mount));
    let storage = claim["spec"]["resources"]["requests"]["storage"]
        .as_str()
        .unwrap();
    let gib: u64 = storage.strip_suffix("Gi").unwrap().parse().unwrap();
    assert!(
        made.cas_max_bytes + made.action_cache_max_bytes < gib << 30,
        "the stores' bounds must fit the {storage} volume"
    );

    // Probes, services and container ports agree with grpc_port.
    for probe in ["readinessProbe", "livenessProbe"] {
        assert_eq!(
            container[probe]["grpc"]["port"].as_u64(),
            Some(u64::from(mesh.grpc_port)),
            "{probe}"
        );
    }
    let container_port = |name: &str| {
        container["ports"]
            .as_sequence()
            .unwrap()
            .iter()
            .find(|p| p["name"].as_str() == Some(name))
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}"))
    };
    assert_eq!(container_port("grpc"), u64::from(mesh.grpc_port));
    assert_eq!(container_port("gossip"), u64::from(mesh.bind_port));
    let selector = at(&set, &["spec", "selector", "matchLabels"]);
    for service in &services {
        assert_eq!(&service["spec"]["selector"], selector);
        for port in service["spec"]["ports"].as_sequence().unwrap() {
            container_port(port["targetPort"].as_str().unwrap());
        }
    }
    assert_eq!(pod["enableServiceLinks"].as_bool(), Some(false));
    let metrics = flag("--metrics-addr");
    assert_eq!(
        metrics.rsplit_once(':').unwrap().1,
        set["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"]
            .as_str()
            .unwrap()
    );
}
