//! The resources of the last applied config, converted (`convert::resource`) and keyed as the
//! protocol keys them: an update converts only what it changes, and the states built from the
//! store share its workloads and Services, so a node holds each once.
//!
//! Before, the node kept every resource as the protobuf bytes it came in and converted all of
//! them at every update: at 100,000 meshed workloads those bytes were 57 MB beside the state
//! built from them, and each update, however small, took ~300 ms of conversion.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use mesh_proto::config::v1 as pb;

use super::{Error, convert};
use crate::state::{Parts, State};

/// A resource's key: its kind and the protocol's key (`mesh_proto::resource_key`).
pub type Key = (i32, String);

pub struct Store {
    items: BTreeMap<Key, convert::Converted>,
    shared: convert::Shared,
    node: String,
    own_address: IpAddr,
}

/// The protocol's key of `r`.
pub fn key_of(r: &pb::Resource) -> Result<Key, Error> {
    let key = mesh_proto::resource_key(r.kind.as_ref().ok_or_else(|| Error::Invalid("resource without a kind".into()))?);
    Ok((key.kind, key.key))
}

impl Store {
    /// An empty store for `node`, whose HBONE address is `own_address` (`convert::resource`).
    pub fn new(node: &str, own_address: IpAddr) -> Self {
        Self { items: BTreeMap::new(), shared: convert::Shared::default(), node: node.to_owned(), own_address }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Converts the resources of `part`, a part of `update`, into it. Parts arrive as the
    /// controller split an update (`more`): converting each as it comes means the node never
    /// holds a large update as protobuf (at 100,000 workloads, ~100 MB decoded, whose small
    /// blocks, freed among the converted ones, glibc could not give back).
    pub fn stage(&mut self, update: &mut Incoming, part: pb::ConfigUpdate) {
        if update.refused.is_some() {
            return;
        }
        for r in &part.upserts {
            match key_of(r).and_then(|k| Ok((k, convert::resource(r, &self.node, self.own_address, &mut self.shared)?))) {
                Ok(converted) => update.upserts.push(converted),
                Err(e) => {
                    update.refused = Some(e);
                    update.upserts = Vec::new();
                    self.shared.prune();
                    return;
                }
            }
        }
        update.removals.extend(part.removals.into_iter().map(|k| (k.kind, k.key)));
    }

    /// Applies a whole update in place, or refuses it with nothing changed (the node keeps
    /// its last good config) when one of its resources did not convert. An update that
    /// converted always builds a state.
    pub fn commit(&mut self, update: Incoming) -> Result<(), Error> {
        if let Some(e) = update.refused {
            return Err(e);
        }
        if update.full {
            self.items.clear();
        }
        if update.upserts.len() > self.items.len() / 8 {
            // A large update rebuilds the map from one sorted list, whose nodes are full: filled
            // one insert at a time, a B-tree splits each node in half as it grows, and at 110,000
            // resources the map took 11.8 MB (~108 B an entry, for 48 B of key and value). In the
            // list an upsert comes after the entry it replaces, and `collect` keeps the last.
            self.items = std::mem::take(&mut self.items).into_iter().chain(update.upserts).collect();
        } else {
            self.items.extend(update.upserts);
        }
        for key in update.removals {
            self.items.remove(&key);
        }
        Ok(())
    }

    /// [`Store::stage`] and [`Store::commit`] of an update in one part.
    #[cfg(test)]
    pub fn apply(&mut self, update: pb::ConfigUpdate) -> Result<(), Error> {
        let mut incoming = Incoming::new(update.version, update.full);
        self.stage(&mut incoming, update);
        self.commit(incoming)
    }

    /// The state of the resources held, sharing their workloads and Services.
    pub fn state(&mut self, trust_domain: &str, root_namespace: &str) -> State {
        let parts: Parts = convert::parts(self.items.values(), &mut self.shared);
        State::from_parts(trust_domain, root_namespace, parts)
    }

    /// Forgets the shared names and label sets no resource holds any more (once the states
    /// built before an update are dropped, or at least replaced).
    pub fn settle(&mut self) {
        self.shared.prune();
    }
}

/// An update being received: its parts' resources, converted.
pub struct Incoming {
    pub version: u64,
    pub full: bool,
    upserts: Vec<(Key, convert::Converted)>,
    removals: Vec<Key>,
    /// Why the update is refused: a resource of one of its parts did not convert. Its later
    /// parts are still received (and dropped), so the stream stays in step.
    refused: Option<Error>,
}

impl Incoming {
    pub fn new(version: u64, full: bool) -> Self {
        Self { version, full, upserts: Vec::new(), removals: Vec::new(), refused: None }
    }

    /// The keys the update replaces or removes.
    pub fn changed(&self) -> HashSet<Key> {
        self.upserts.iter().map(|(k, _)| k.clone()).chain(self.removals.iter().cloned()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, name: &str) -> pb::Resource {
        let w = pb::Workload { uid: uid.into(), name: name.into(), addresses: vec!["198.18.1.1".into()], ..Default::default() };
        pb::Resource { kind: Some(pb::resource::Kind::Workload(w)) }
    }

    /// Each key with the name of the workload held under it.
    fn names(store: &Store) -> Vec<(String, String)> {
        let name = |c: &convert::Converted| match c {
            convert::Converted::Workload(w) => w.name.to_string(),
            other => format!("{other:?}"),
        };
        store.items.iter().map(|(k, c)| (k.1.clone(), name(c))).collect()
    }

    #[test]
    fn updates_apply_in_place_and_a_refused_one_changes_nothing() {
        let mut store = Store::new("n1", IpAddr::from([198, 18, 0, 1]));
        let first = pb::ConfigUpdate { version: 1, full: true, upserts: vec![workload("a", "a1"), workload("b", "b1")], ..Default::default() };
        store.apply(first).expect("apply");
        let before = names(&store);
        // Changes a, removes b, adds c and removes it again in the same update.
        let key = |uid: &str| pb::ResourceKey { kind: pb::ResourceKind::Workload.into(), key: uid.into() };
        let second = pb::ConfigUpdate { version: 2, upserts: vec![workload("a", "a2"), workload("c", "c1")], removals: vec![key("b"), key("c")], ..Default::default() };
        store.apply(second).expect("apply");
        assert_eq!(names(&store), [("a".to_owned(), "a2".to_owned())]);
        let whole = pb::ConfigUpdate { version: 3, full: true, upserts: vec![workload("b", "b2")], ..Default::default() };
        store.apply(whole).expect("apply");
        assert_eq!(names(&store), [("b".to_owned(), "b2".to_owned())], "a full update replaces everything");
        let first = pb::ConfigUpdate { version: 3, full: true, upserts: vec![workload("a", "a1"), workload("b", "b1")], ..Default::default() };
        store.apply(first).expect("apply");
        let nameless = pb::ConfigUpdate { version: 3, full: true, upserts: vec![workload("z", "z"), pb::Resource { kind: None }], ..Default::default() };
        assert!(store.apply(nameless).is_err());
        assert_eq!(names(&store), before, "a refused full update leaves the previous set whole");
        let nameless = pb::ConfigUpdate { version: 4, upserts: vec![workload("d", "d"), pb::Resource { kind: None }], ..Default::default() };
        assert!(store.apply(nameless).is_err());
        assert_eq!(names(&store), before, "an update with a resource without a kind changes nothing");
        let mut unconvertible = workload("e", "e");
        if let Some(pb::resource::Kind::Workload(w)) = &mut unconvertible.kind {
            w.addresses = vec!["not an address".into()];
        }
        let bad = pb::ConfigUpdate { version: 5, upserts: vec![workload("a", "a3"), unconvertible], ..Default::default() };
        assert!(store.apply(bad).is_err(), "a resource that does not convert refuses the update");
        assert_eq!(names(&store), before, "and changes nothing");
    }

    #[test]
    fn an_update_in_parts_applies_at_its_commit_or_not_at_all() {
        let mut store = Store::new("n1", IpAddr::from([198, 18, 0, 1]));
        store.apply(pb::ConfigUpdate { version: 1, full: true, upserts: vec![workload("a", "a1")], ..Default::default() }).expect("apply");
        let part = |upserts| pb::ConfigUpdate { version: 2, full: true, upserts, ..Default::default() };
        let mut update = Incoming::new(2, true);
        store.stage(&mut update, part(vec![workload("b", "b1")]));
        store.stage(&mut update, part(vec![workload("c", "c1")]));
        assert_eq!(names(&store), [("a".to_owned(), "a1".to_owned())], "nothing applies before the commit");
        assert_eq!(update.changed().len(), 2);
        store.commit(update).expect("commit");
        assert_eq!(names(&store).len(), 2, "b and c replace a");
        let before = names(&store);
        let mut unconvertible = workload("e", "e");
        if let Some(pb::resource::Kind::Workload(w)) = &mut unconvertible.kind {
            w.addresses = vec!["not an address".into()];
        }
        let mut update = Incoming::new(3, false);
        store.stage(&mut update, pb::ConfigUpdate { version: 3, upserts: vec![unconvertible], ..Default::default() });
        store.stage(&mut update, pb::ConfigUpdate { version: 3, upserts: vec![workload("d", "d1")], ..Default::default() });
        assert!(store.commit(update).is_err(), "a part that did not convert refuses the whole update");
        assert_eq!(names(&store), before);
    }

    #[test]
    fn small_and_large_updates_replace_what_they_upsert() {
        let mut store = Store::new("n1", IpAddr::from([198, 18, 0, 1]));
        let all = |name: &str| (0..100).map(|i| workload(&format!("w{i:03}"), &format!("{name}{i}"))).collect::<Vec<_>>();
        store.apply(pb::ConfigUpdate { version: 1, full: true, upserts: all("a"), ..Default::default() }).expect("apply");
        // One of 100: inserted into the map as it is.
        store.apply(pb::ConfigUpdate { version: 2, upserts: vec![workload("w005", "b5")], ..Default::default() }).expect("apply");
        // Half of them: the map is rebuilt from one sorted list.
        let half = all("c").into_iter().step_by(2).collect();
        store.apply(pb::ConfigUpdate { version: 3, upserts: half, ..Default::default() }).expect("apply");
        let names = names(&store);
        assert_eq!(names.len(), 100);
        assert_eq!([&names[1].1, &names[4].1, &names[5].1], ["a1", "c4", "b5"]);
    }

    #[test]
    fn states_share_the_stores_workloads_and_services() {
        let mut store = Store::new("n1", IpAddr::from([198, 18, 0, 1]));
        let service = pb::Resource {
            kind: Some(pb::resource::Kind::Service(pb::Service { name: "s".into(), namespace: "demo".into(), ..Default::default() })),
        };
        store.apply(pb::ConfigUpdate { version: 1, full: true, upserts: vec![workload("a", "a1"), service], ..Default::default() }).expect("apply");
        let one = store.state("cluster.local", "mesh-system");
        let two = store.state("cluster.local", "mesh-system");
        let ip = IpAddr::from([198, 18, 1, 1]);
        assert!(std::ptr::eq(one.workload(ip).expect("a1"), two.workload(ip).expect("a1")), "one workload, not a copy per state");
        assert!(std::sync::Arc::ptr_eq(&one.services[0], &two.services[0]), "one Service");
    }

    #[test]
    fn a_converted_resource_is_small() {
        assert!(size_of::<convert::Converted>() <= 24, "{} bytes", size_of::<convert::Converted>());
    }
}
