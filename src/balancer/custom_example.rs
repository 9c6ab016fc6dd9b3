//! An example of adding a balancer: this file plus one line in [`super::REGISTRY`]
//! (`("first_usable", custom_example::build)`, compiled for tests only). It picks the first
//! usable endpoint not yet tried, i.e. a primary with ordered fallbacks.
use super::{Balancer, PickContext, Tried};
use crate::config::UpstreamSettings;
use crate::upstream::Endpoint;

pub struct FirstUsable;

pub fn build(_endpoints: &[Endpoint], _settings: &UpstreamSettings) -> Box<dyn Balancer> {
    Box::new(FirstUsable)
}

impl Balancer for FirstUsable {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        (0..endpoints.len()).find(|&i| !tried.contains(i) && endpoints[i].usable(ctx))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, endpoints};
    use super::super::{factory, names, Candidates};
    use super::*;

    #[test]
    fn registered_by_name_and_used_through_candidates() {
        assert!(names().contains(&"first_usable"));
        let mut eps = endpoints(&[1, 1, 1, 1]);
        eps[1].healthy = false;
        let build = factory("first_usable").expect("registered");
        let b = build(&eps, &UpstreamSettings::with_balancer("first_usable"));
        let order: Vec<u16> = Candidates::new(b.as_ref(), &eps, ctx())
            .map(|e| e.authority.port_u16().unwrap())
            .collect();
        assert_eq!(order, vec![10_000, 10_002, 10_003]);
    }
}
