//! Views that share what every node receives alike, and updates built from them part by part.
//!
//! Most of a node's view is the same for every node: the meshed workloads of the whole mesh, the
//! Services with their endpoints, the route tables. Converted once per published state into a
//! [`Resources`] map of reference-counted resources, that part is shared by every node's view
//! (one copy, not one per node), and reused across states where a resource did not change, so a
//! diff between two states compares unchanged resources by pointer. An update is cut into
//! messages as it is sent ([`Outgoing::parts`]): a resource is copied into a message only for
//! the part that carries it, never all at once.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use mesh_proto::config::v1 as pb;

/// (kind, key) of a resource.
pub type Key = (i32, String);

/// Resources by (kind, key), shareable.
pub type Resources = BTreeMap<Key, Arc<pb::Resource>>;

/// What one node receives: the shared part every node gets and the node's own (its unmeshed
/// workloads, the policies with its workloads' uids). No key is in both.
#[derive(Clone, Debug, Default)]
pub struct View {
    common: Arc<Resources>,
    own: Resources,
}

impl View {
    pub(super) fn new(common: Arc<Resources>, own: Resources) -> Self {
        debug_assert!(own.keys().all(|k| !common.contains_key(k)), "a key in both parts");
        Self { common, own }
    }

    pub fn get(&self, key: &Key) -> Option<&pb::Resource> {
        self.shared(key).map(|r| &**r)
    }

    fn shared(&self, key: &Key) -> Option<&Arc<pb::Resource>> {
        self.own.get(key).or_else(|| self.common.get(key))
    }

    pub fn contains_key(&self, key: &Key) -> bool {
        self.own.contains_key(key) || self.common.contains_key(key)
    }

    pub fn len(&self) -> usize {
        self.common.len() + self.own.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Both parts, merged in key order (as one map would iterate).
    fn entries(&self) -> impl Iterator<Item = (&Key, &Arc<pb::Resource>)> {
        let (mut common, mut own) = (self.common.iter().peekable(), self.own.iter().peekable());
        std::iter::from_fn(move || match (common.peek(), own.peek()) {
            (Some(c), Some(o)) if o.0 < c.0 => own.next(),
            (Some(_), _) => common.next(),
            (None, _) => own.next(),
        })
    }

    pub fn keys(&self) -> impl Iterator<Item = &Key> {
        self.entries().map(|(k, _)| k)
    }

    pub fn values(&self) -> impl Iterator<Item = &pb::Resource> {
        self.entries().map(|(_, v)| &**v)
    }

    /// Copies of every resource.
    pub fn into_values(self) -> impl Iterator<Item = pb::Resource> {
        self.entries().map(|(_, v)| (**v).clone()).collect::<Vec<_>>().into_iter()
    }

    /// Everything, as a full update (nothing copied until sent).
    pub fn full(&self, version: u64) -> Outgoing {
        Outgoing { version, full: true, upserts: self.entries().map(|(_, v)| Arc::clone(v)).collect(), removals: Vec::new() }
    }
}

/// Equal when they hold the same resources, however split between the parts.
impl PartialEq for View {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.entries().all(|(k, v)| other.get(k) == Some(&**v))
    }
}

/// Upserts (new or changed) and removals that turn `old` into `new`. A resource shared by both
/// (the same allocation) is unchanged without being compared.
pub fn diff(old: &View, new: &View) -> (Vec<Arc<pb::Resource>>, Vec<pb::ResourceKey>) {
    let upserts = new
        .entries()
        .filter(|(k, v)| old.shared(k).is_none_or(|o| !Arc::ptr_eq(o, v) && **o != ***v))
        .map(|(_, v)| Arc::clone(v))
        .collect();
    let removals = old.keys().filter(|k| !new.contains_key(k)).map(|(kind, key)| pb::ResourceKey { kind: *kind, key: key.clone() }).collect();
    (upserts, removals)
}

/// `built`, with each resource equal to one in `previous` replaced by that one: consecutive
/// states share their unchanged resources.
pub fn reuse(built: Resources, previous: Option<&Resources>) -> Resources {
    let Some(previous) = previous else { return built };
    built
        .into_iter()
        .map(|(k, v)| match previous.get(&k) {
            Some(p) if **p == *v => (k, Arc::clone(p)),
            _ => (k, v),
        })
        .collect()
}

/// The shared part of the latest published state, built by the first node stream that needs
/// it (the others wait and share it) from the previous one ([`reuse`]).
#[derive(Debug, Default)]
pub struct Cache {
    last: Mutex<Option<(u64, Arc<Resources>)>>,
}

impl Cache {
    /// The shared part for state `version`, built by `build` from the previous state's unless
    /// cached. A stream still on an older state than the cache's gets its own, uncached.
    pub fn get(&self, version: u64, build: impl FnOnce(Option<&Resources>) -> Resources) -> Arc<Resources> {
        let mut last = self.last.lock().expect("not poisoned");
        match &*last {
            Some((v, common)) if *v == version => Arc::clone(common),
            Some((v, _)) if *v > version => Arc::new(build(None)),
            cached => {
                let built = Arc::new(build(cached.as_ref().map(|(_, c)| &**c)));
                *last = Some((version, Arc::clone(&built)));
                built
            }
        }
    }
}

/// An update on its way to a node: the resources are the view's, copied into a message only by
/// [`Outgoing::parts`].
#[derive(Debug)]
pub struct Outgoing {
    pub version: u64,
    pub full: bool,
    pub upserts: Vec<Arc<pb::Resource>>,
    pub removals: Vec<pb::ResourceKey>,
}

impl Outgoing {
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }

    /// The update as messages of at most `max_bytes` each, in order, all but the last marked
    /// `more` (a single resource larger than that goes alone); one message without `more` when
    /// it fits. Each message is built when the iterator is advanced, so a sender that waits for
    /// the node between parts holds one part's copy at a time.
    pub fn parts(self, max_bytes: usize) -> Parts {
        Parts { update: self, max_bytes, next_upsert: 0, next_removal: 0, started: false }
    }
}

/// See [`Outgoing::parts`].
#[derive(Debug)]
pub struct Parts {
    update: Outgoing,
    max_bytes: usize,
    next_upsert: usize,
    next_removal: usize,
    started: bool,
}

impl Iterator for Parts {
    type Item = pb::ConfigUpdate;

    fn next(&mut self) -> Option<pb::ConfigUpdate> {
        use prost::encoding::message::encoded_len;
        // Room for version, full and more in every part.
        const HEADER: usize = 16;
        let (ups, rms) = (&self.update.upserts, &self.update.removals);
        let done = self.next_upsert == ups.len() && self.next_removal == rms.len();
        // An empty update is still one message (a full update of an empty view says so).
        if done && self.started {
            return None;
        }
        self.started = true;
        let mut part = pb::ConfigUpdate { version: self.update.version, full: self.update.full, more: false, upserts: Vec::new(), removals: Vec::new() };
        let mut size = HEADER;
        // A part holding nothing yet takes even an item larger than the limit.
        let fits = |size: usize, n: usize| size == HEADER || size + n <= self.max_bytes;
        while let Some(r) = ups.get(self.next_upsert) {
            let n = encoded_len(3, &**r);
            if !fits(size, n) {
                break;
            }
            size += n;
            part.upserts.push((**r).clone());
            self.next_upsert += 1;
        }
        if self.next_upsert == ups.len() {
            while let Some(k) = rms.get(self.next_removal) {
                let n = encoded_len(4, k);
                if !fits(size, n) {
                    break;
                }
                size += n;
                part.removals.push(k.clone());
                self.next_removal += 1;
            }
        }
        part.more = self.next_upsert < ups.len() || self.next_removal < rms.len();
        Some(part)
    }
}

/// `update` in parts ([`Outgoing::parts`]).
pub fn split(update: pb::ConfigUpdate, max_bytes: usize) -> Vec<pb::ConfigUpdate> {
    let pb::ConfigUpdate { version, full, upserts, removals, .. } = update;
    Outgoing { version, full, upserts: upserts.into_iter().map(Arc::new).collect(), removals }.parts(max_bytes).collect()
}
