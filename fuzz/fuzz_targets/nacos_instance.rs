//! Nacos instances as the SDK hands them over: arbitrary `ServiceInstance` fields through
//! `nacos::map_instance` (and so `weight_of`). No panic; a mapped instance never has port 0.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use nacos_sdk::api::naming::ServiceInstance;

#[derive(Debug, Arbitrary)]
struct Input {
    instance_id: Option<String>,
    ip: String,
    port: i32,
    weight: f64,
    healthy: bool,
    enabled: bool,
    ephemeral: bool,
    cluster_name: Option<String>,
    service_name: Option<String>,
    metadata: HashMap<String, String>,
}

fuzz_target!(|input: Input| {
    let i = ServiceInstance {
        instance_id: input.instance_id,
        ip: input.ip,
        port: input.port,
        weight: input.weight,
        healthy: input.healthy,
        enabled: input.enabled,
        ephemeral: input.ephemeral,
        cluster_name: input.cluster_name,
        service_name: input.service_name,
        metadata: input.metadata,
    };
    if let Ok(inst) = discovery::nacos::map_instance(&i) {
        assert!(inst.port != 0, "port 0 accepted");
        assert_eq!(inst.weight, discovery::nacos::weight_of(i.weight));
    }
});
