//! The election's decisions on a simulated clock (no API server, no sleeping).

use super::*;

const T: Timing = Timing::DEFAULT;

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

fn held(holder: Option<&str>, version: &str, transitions: i32) -> Record {
    Record { holder: holder.map(str::to_owned), version: version.into(), transitions }
}

#[test]
fn the_default_timing_is_client_gos_and_safe() {
    assert_eq!((T.lease, T.renew_deadline, T.retry, T.renew_every), (secs(15.0), secs(10.0), secs(2.0), secs(5.0)));
    assert!(T.is_safe());
    assert!(!Timing { renew_deadline: secs(15.0), ..T }.is_safe(), "the holder must stop before others may take over");
    assert!(!Timing { renew_every: secs(10.0), ..T }.is_safe(), "renewals must come before the deadline");
}

#[test]
fn no_lease_is_created_and_a_successful_create_leads_until_the_renew_deadline() {
    let t0 = Instant::now();
    let mut e = Election::new("a", T);
    assert!(!e.is_leader(t0));
    assert_eq!(e.observe(None, t0), Action::Create);
    e.written(t0);
    assert!(e.is_leader(t0));
    assert_eq!(e.leading_until(), Some(t0 + secs(10.0)));
    assert_eq!(e.next_wakeup(t0), t0 + secs(5.0), "renew every 5 s");
    // A renewal read before it is due waits; when due, claims with the version read.
    assert_eq!(e.observe(Some(held(Some("a"), "1", 0)), t0 + secs(1.0)), Action::WaitUntil(t0 + secs(5.0)));
    assert_eq!(e.observe(Some(held(Some("a"), "1", 0)), t0 + secs(5.0)), Action::Claim { version: "1".into(), transitions: 0 });
    e.written(t0 + secs(5.0));
    assert!(e.is_leader(t0 + secs(14.9)), "renewed at 5 s: leads until 15 s");
    assert!(!e.is_leader(t0 + secs(15.0)));
}

#[test]
fn a_follower_takes_over_only_after_the_record_stayed_unchanged_for_the_lease_duration_on_its_own_clock() {
    let t0 = Instant::now();
    let mut b = Election::new("b", T);
    // The record's own timestamps are not even looked at: only when *we* saw it change.
    assert_eq!(b.observe(Some(held(Some("a"), "7", 2)), t0), Action::WaitUntil(t0 + secs(2.0)));
    assert_eq!(b.observe(Some(held(Some("a"), "7", 2)), t0 + secs(10.0)), Action::WaitUntil(t0 + secs(12.0)));
    // The holder renews at 12 s: the 15 s start again from there.
    assert_eq!(b.observe(Some(held(Some("a"), "8", 2)), t0 + secs(12.0)), Action::WaitUntil(t0 + secs(14.0)));
    assert_eq!(b.observe(Some(held(Some("a"), "8", 2)), t0 + secs(26.0)), Action::WaitUntil(t0 + secs(27.0)), "a wakeup exactly at expiry");
    assert!(!b.is_leader(t0 + secs(26.0)));
    assert_eq!(b.observe(Some(held(Some("a"), "8", 2)), t0 + secs(27.0)), Action::Claim { version: "8".into(), transitions: 3 });
    b.written(t0 + secs(27.0));
    assert!(b.is_leader(t0 + secs(27.0)));
}

#[test]
fn a_released_lease_is_taken_at_once() {
    let t0 = Instant::now();
    let mut b = Election::new("b", T);
    assert_eq!(b.observe(Some(held(None, "9", 4)), t0), Action::Claim { version: "9".into(), transitions: 5 });
}

#[test]
fn a_leader_that_cannot_renew_stops_leading_at_the_deadline_before_anyone_may_take_over() {
    let t0 = Instant::now();
    let mut a = Election::new("a", T);
    a.observe(None, t0);
    a.written(t0);
    // The API server is unreachable: errors that are not conflicts keep the lead until 10 s.
    a.write_failed(false, t0 + secs(5.0));
    assert!(a.is_leader(t0 + secs(7.0)));
    assert_eq!(a.next_wakeup(t0 + secs(7.0)), t0 + secs(7.0), "renewal overdue: try again now");
    a.write_failed(false, t0 + secs(9.0));
    assert!(!a.is_leader(t0 + secs(10.0)));
    assert_eq!(a.leading_until(), Some(t0 + secs(10.0)), "the deadline, now past");
    // When it reads the Lease again, still its own and unchanged, it may renew and lead again:
    // nobody else wrote in between, or this version would be gone.
    assert_eq!(a.observe(Some(held(Some("a"), "1", 0)), t0 + secs(11.0)), Action::Claim { version: "1".into(), transitions: 0 });
}

#[test]
fn a_conflict_or_another_holder_ends_the_lead_at_once() {
    let t0 = Instant::now();
    let mut a = Election::new("a", T);
    a.observe(None, t0);
    a.written(t0);
    a.write_failed(true, t0 + secs(5.0));
    assert!(!a.is_leader(t0 + secs(5.0)), "someone else wrote the Lease first");

    let mut a = Election::new("a", T);
    a.observe(None, t0);
    a.written(t0);
    assert_eq!(a.observe(Some(held(Some("b"), "3", 1)), t0 + secs(1.0)), Action::WaitUntil(t0 + secs(3.0)));
    assert!(!a.is_leader(t0 + secs(1.0)));
}

#[test]
fn a_restart_under_the_same_name_takes_its_lease_back_at_once() {
    let t0 = Instant::now();
    let mut a = Election::new("a", T);
    assert_eq!(a.observe(Some(held(Some("a"), "5", 1)), t0), Action::Claim { version: "5".into(), transitions: 1 });
}

/// Two replicas against one simulated Lease, with random API failures, lost responses (the
/// write happened but the writer never heard), stalls and a crash: at no instant do both lead,
/// and after the crash the survivor leads within lease duration + one retry of the last write.
#[test]
fn two_replicas_never_lead_at_once_and_the_survivor_takes_over_after_a_crash() {
    struct Lease {
        record: Option<Record>,
        next_version: u64,
    }
    impl Lease {
        fn write(&mut self, holder: &str, expected: Option<&str>, transitions: i32) -> bool {
            let current = self.record.as_ref().map(|r| r.version.as_str());
            if current != expected {
                return false;
            }
            self.next_version += 1;
            self.record = Some(Record { holder: Some(holder.into()), version: self.next_version.to_string(), transitions });
            true
        }
    }
    // A tiny deterministic generator (no dependency): same run every time.
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut rnd = move |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let t0 = Instant::now();
    let step = Duration::from_millis(100);
    let mut lease = Lease { record: None, next_version: 0 };
    let mut replicas = [Election::new("a", T), Election::new("b", T)];
    let mut wake = [t0, t0 + Duration::from_millis(30)];
    let crash_at = t0 + secs(300.0);
    let mut last_write_before_crash = t0;
    let mut crashed: Option<usize> = None;
    let mut taken_over: Option<Instant> = None;
    let mut leader_changes = 0;
    let mut last_leader = None;
    for tick in 0..5000_u32 {
        let now = t0 + step * tick;
        if crashed.is_none() && now >= crash_at {
            crashed = [0, 1].into_iter().find(|&i| replicas[i].is_leader(now));
            assert!(crashed.is_some(), "somebody leads before the crash");
        }
        for i in 0..2 {
            if crashed == Some(i) || now < wake[i] {
                continue;
            }
            // 10 % of reads fail; a replica may also stall for up to 8 s (a GC pause, a hung call).
            if rnd(10) == 0 {
                replicas[i].write_failed(false, now);
                wake[i] = now + T.retry;
                continue;
            }
            if rnd(50) == 0 {
                wake[i] = now + secs(8.0);
                continue;
            }
            let action = replicas[i].observe(lease.record.clone(), now);
            wake[i] = match action {
                Action::WaitUntil(at) => at,
                Action::Create | Action::Claim { .. } => {
                    let (expected, transitions) = match &action {
                        Action::Claim { version, transitions } => (Some(version.clone()), *transitions),
                        _ => (None, 0),
                    };
                    let ok = lease.write(replicas[i].identity(), expected.as_deref(), transitions);
                    if ok && crashed.is_none() {
                        last_write_before_crash = now;
                    }
                    // 5 % of successful writes lose their response: the writer counts it as failed.
                    if ok && rnd(20) != 0 {
                        replicas[i].written(now);
                    } else {
                        replicas[i].write_failed(!ok, now);
                    }
                    replicas[i].next_wakeup(now)
                }
            };
        }
        let leaders: Vec<usize> = (0..2).filter(|&i| crashed != Some(i) && replicas[i].is_leader(now)).collect();
        assert!(leaders.len() <= 1, "both lead at {:?}", now - t0);
        if let (Some(c), [l]) = (crashed, leaders.as_slice()) {
            assert_ne!(*l, c);
            taken_over.get_or_insert(now);
        }
        if let [l] = leaders.as_slice()
            && last_leader != Some(*l)
        {
            leader_changes += 1;
            last_leader = Some(*l);
        }
    }
    let took = taken_over.expect("the survivor took over") - last_write_before_crash;
    assert!(took <= T.lease + T.retry + T.retry + secs(8.0), "took over {took:?} after the last write (a stall of up to 8 s included)");
    assert!(leader_changes >= 2, "leadership moved at least at the crash ({leader_changes})");
}
