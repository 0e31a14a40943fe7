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
