//! A metric family whose label sets can be dropped. Istio's standard metrics carry workload
//! names; `prometheus_client`'s `Family` can remove a set only by naming it, and offers no way to
//! find the sets of a workload that is gone, so a node where workloads come and go would keep
//! every set it ever saw. This family encodes exactly as `Family` does (same exposition) and adds
//! [`PrunableFamily::retain`].

use std::{
    collections::HashMap,
    fmt,
    hash::Hash,
    sync::{Arc, PoisonError, RwLock},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder},
    metrics::{MetricType, TypedMetric, family::MetricConstructor},
};

pub struct PrunableFamily<S, M, C = fn() -> M> {
    sets: Arc<RwLock<HashMap<S, M>>>,
    constructor: C,
}

impl<S: Clone + Hash + Eq, M: Default + Clone> Default for PrunableFamily<S, M> {
    fn default() -> Self {
        Self::new_with_constructor(M::default)
    }
}

impl<S, M, C: Clone> Clone for PrunableFamily<S, M, C> {
    fn clone(&self) -> Self {
        Self { sets: self.sets.clone(), constructor: self.constructor.clone() }
    }
}

impl<S, M, C> fmt::Debug for PrunableFamily<S, M, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PrunableFamily").field("sets", &self.len()).finish_non_exhaustive()
    }
}

impl<S, M, C> PrunableFamily<S, M, C> {
    pub fn len(&self) -> usize {
        self.sets.read().unwrap_or_else(PoisonError::into_inner).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<S: Clone + Hash + Eq, M: Clone, C: MetricConstructor<M>> PrunableFamily<S, M, C> {
    pub fn new_with_constructor(constructor: C) -> Self {
        Self { sets: Arc::default(), constructor }
    }

    /// The metric of `labels` (a handle sharing its value), created on first use.
    pub fn get_or_create(&self, labels: &S) -> M {
        if let Some(m) = self.sets.read().unwrap_or_else(PoisonError::into_inner).get(labels) {
            return m.clone();
        }
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        sets.entry(labels.clone()).or_insert_with(|| self.constructor.new_metric()).clone()
    }

    /// Drops every label set `keep` refuses; returns how many went. A handle still held (an
    /// open connection's) keeps counting into a value no longer exposed; its next
    /// `get_or_create` starts the set again from zero, which Prometheus reads as a counter reset.
    pub fn retain(&self, mut keep: impl FnMut(&S) -> bool) -> usize {
        let mut sets = self.sets.write().unwrap_or_else(PoisonError::into_inner);
        let before = sets.len();
        sets.retain(|labels, _| keep(labels));
        before - sets.len()
    }
}

impl<S, M, C> EncodeMetric for PrunableFamily<S, M, C>
where
    S: Clone + Hash + Eq + EncodeLabelSet,
    M: EncodeMetric + TypedMetric,
{
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), fmt::Error> {
        for (labels, m) in self.sets.read().unwrap_or_else(PoisonError::into_inner).iter() {
            m.encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn metric_type(&self) -> MetricType {
        M::TYPE
    }

    fn is_empty(&self) -> bool {
        PrunableFamily::is_empty(self)
    }
}

impl<S, M: TypedMetric, C> TypedMetric for PrunableFamily<S, M, C> {
    const TYPE: MetricType = M::TYPE;
}

#[cfg(test)]
mod tests {
    use prometheus_client::{
        encoding::{EncodeLabelSet, text::encode},
        metrics::{counter::Counter, family::Family, histogram::Histogram},
        registry::Registry,
    };

    use super::*;

    #[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
    struct Labels {
        workload: String,
    }

    fn labels(w: &str) -> Labels {
        Labels { workload: w.into() }
    }

    #[test]
    fn encodes_as_a_family_does_and_drops_what_retain_refuses() {
        let (mut ours, mut theirs) = (Registry::default(), Registry::default());
        let prunable = PrunableFamily::<Labels, Counter>::default();
        let family = Family::<Labels, Counter>::default();
        ours.register("requests", "Requests", prunable.clone());
        theirs.register("requests", "Requests", family.clone());
        for w in ["a", "b", "a"] {
            prunable.get_or_create(&labels(w)).inc();
            family.get_or_create(&labels(w)).inc();
        }
        let text = |r: &Registry| {
            let mut s = String::new();
            encode(&mut s, r).expect("encode");
            let mut lines: Vec<String> = s.lines().map(str::to_owned).collect();
            lines.sort();
            lines
        };
        assert_eq!(text(&ours), text(&theirs), "the same exposition");
        assert!(text(&ours).contains(&r#"requests_total{workload="a"} 2"#.to_owned()));

        assert_eq!(prunable.retain(|l| l.workload != "a"), 1);
        assert_eq!(prunable.len(), 1);
        let after = text(&ours);
        assert!(!after.iter().any(|l| l.contains("\"a\"")), "{after:?}");
        prunable.get_or_create(&labels("a")).inc();
        assert!(text(&ours).contains(&r#"requests_total{workload="a"} 1"#.to_owned()), "starts again from zero");
    }

    #[test]
    fn histograms_take_a_constructor() {
        let f: PrunableFamily<Labels, Histogram> = PrunableFamily::new_with_constructor(|| Histogram::new([1.0, 10.0]));
        f.get_or_create(&labels("a")).observe(5.0);
        let mut r = Registry::default();
        r.register("duration", "Duration", f);
        let mut s = String::new();
        encode(&mut s, &r).expect("encode");
        assert!(s.contains(r#"duration_bucket{le="10.0",workload="a"} 1"#), "{s}");
    }
}
