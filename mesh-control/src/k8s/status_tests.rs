use super::*;
use crate::{model::NamespacedName, validate::Error};

fn verdict(result: Result<(), Error>, generation: i64) -> Verdict {
    Verdict { kind: PolicyKind::AuthorizationPolicy, key: NamespacedName::new("demo", "p"), generation: Some(generation), result }
}

fn ts(s: &str) -> Timestamp {
    s.parse().expect("timestamp")
}

#[test]
fn rejected_policy_gets_accepted_false_with_reason_and_message() {
    let bad = verdict(Err(Error::UnknownAction { value: "NOPE".into() }), 3);
    let s = desired(&bad, None, ts("2026-01-01T00:00:00Z")).expect("a status to write");
    assert_eq!(s.observed_generation, Some(3));
    let c = &s.conditions[0];
    assert_eq!((c.type_.as_str(), c.status.as_str(), c.reason.as_str()), ("Accepted", "False", "UnknownAction"));
    assert!(c.message.contains("NOPE"), "{}", c.message);
    // Up to date: nothing to write (no write loop).
    assert_eq!(desired(&bad, Some(&s), ts("2026-01-02T00:00:00Z")), None);
    // A new generation with the same error is written, keeping the transition time.
    let again = desired(&verdict(Err(Error::UnknownAction { value: "NOPE".into() }), 4), Some(&s), ts("2026-01-03T00:00:00Z")).expect("write");
    assert_eq!(again.conditions[0].last_transition_time, c.last_transition_time);
    // Fixed: Accepted=True, with a new transition time.
    let fixed = desired(&verdict(Ok(()), 5), Some(&again), ts("2026-01-04T00:00:00Z")).expect("write");
    assert_eq!((fixed.conditions[0].status.as_str(), fixed.conditions[0].reason.as_str()), ("True", "Accepted"));
    assert_eq!(fixed.conditions[0].last_transition_time, Time(ts("2026-01-04T00:00:00Z")));
}
