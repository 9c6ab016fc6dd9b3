//! An example of adding a balancer: this file plus one line in [`super::REGISTRY`]
//! (`custom_example::KIND`, compiled for tests only), settings included. It picks the first
//! usable endpoint not yet tried, i.e. a primary with ordered fallbacks.
use std::sync::Arc;

use super::{Balancer, Kind, Options, PickContext, Settings, Tried};
use crate::endpoint::Endpoint;

pub const KIND: Kind = Kind {
    name: "first_usable",
    options: &[],
    settings: |_: &Options| Ok(Arc::new(FirstUsable)),
};

#[derive(Debug, PartialEq)]
pub struct FirstUsable;

impl Settings for FirstUsable {
    fn build(&self, _endpoints: &[Endpoint]) -> Box<dyn Balancer> {
        Box::new(FirstUsable)
    }
}

impl Balancer for FirstUsable {
    fn next(&self, endpoints: &[Endpoint], ctx: &PickContext, tried: &Tried) -> Option<usize> {
        (0..endpoints.len()).find(|&i| !tried.contains(i) && ctx.usable(&endpoints[i]))
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::{ctx, endpoints};
    use super::super::{names, Candidates, Spec};

    #[test]
    fn registered_by_name_and_used_through_candidates() {
        assert!(names().contains(&"first_usable"));
        let mut eps = endpoints(&[1, 1, 1, 1]);
        eps[1].healthy = false;
        let b = Spec::named("first_usable").expect("registered").build(&eps);
        let order: Vec<u16> = Candidates::new(b.as_ref(), &eps, ctx())
            .map(|e| e.authority.port_u16().unwrap())
            .collect();
        assert_eq!(order, vec![10_000, 10_002, 10_003]);
    }
}
