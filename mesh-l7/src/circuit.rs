//! Circuit breaking, Envoy's way: a Service (or subset) has at most so many requests in flight
//! from this node (`http2MaxRequests`), HTTP/1.1 requests each need one of `maxConnections`
//! upstream connections and wait for one as pending, at most `http1MaxPendingRequests` of them.
//! A request over a limit is answered at once with 503 and flag `UO`; it never queues
//! unboundedly.
//!
//! A [`Breaker`] is per Service (or subset) per node; its limits never change (a new policy
//! gets a new breaker). An [`Admitted`] request holds its slots until it is dropped, which the
//! caller arranges to be when the response body ends ([`crate::body::holding`]).

use std::sync::{
    Arc,
    atomic::{AtomicU32, AtomicU64, Ordering},
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::policy::ConnectionPool;

pub struct Breaker {
    limits: ConnectionPool,
    active: AtomicU32,
    pending: AtomicU32,
    /// HTTP/1.1 connections carrying a request, when `maxConnections` is set.
    connections: Option<Arc<Semaphore>>,
    /// Requests refused, by the limit that refused them: (requests, pending).
    overflows: [AtomicU64; 2],
}

/// Which limit refused a request (the access log says it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    #[error("circuit breaker: http2MaxRequests requests in flight")]
    Requests,
    #[error("circuit breaker: maxConnections in use and http1MaxPendingRequests waiting")]
    Pending,
}

/// A request let through: its slots are given back when this is dropped.
pub struct Admitted {
    breaker: Arc<Breaker>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        self.breaker.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts one pending request while it waits (also when the wait is cancelled).
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Breaker {
    pub fn new(limits: &ConnectionPool) -> Self {
        let permits = limits
            .max_connections
            .map(|m| Arc::new(Semaphore::new(m as usize)));
        Self {
            limits: limits.clone(),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: permits,
            overflows: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }

    pub fn limits(&self) -> &ConnectionPool {
        &self.limits
    }

    /// Requests refused so far: (over `http2MaxRequests`, over `http1MaxPendingRequests`).
    pub fn overflows(&self) -> (u64, u64) {
        (
            self.overflows[0].load(Ordering::Relaxed),
            self.overflows[1].load(Ordering::Relaxed),
        )
    }

    /// Lets one request through, or says which limit it is over. An HTTP/1.1 request (`http1`)
    /// also takes a connection slot, waiting for one if all are in use and fewer than
    /// `http1MaxPendingRequests` requests wait already.
    pub async fn admit(self: &Arc<Self>, http1: bool) -> Result<Admitted, Overflow> {
        let before = self.active.fetch_add(1, Ordering::Relaxed);
        let mut admitted = Admitted {
            breaker: self.clone(),
            _connection: None,
        };
        if self
            .limits
            .http2_max_requests
            .is_some_and(|max| before >= max)
        {
            self.overflows[0].fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Requests);
        }
        let Some(connections) = self.connections.as_ref().filter(|_| http1) else {
            return Ok(admitted);
        };
        if let Ok(permit) = connections.clone().try_acquire_owned() {
            admitted._connection = Some(permit);
            return Ok(admitted);
        }
        let waiting = self.pending.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.pending);
        if self
            .limits
            .http1_max_pending_requests
            .is_some_and(|max| waiting >= max)
        {
            self.overflows[1].fetch_add(1, Ordering::Relaxed);
            return Err(Overflow::Pending);
        }
        let permit = connections
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        admitted._connection = Some(permit);
        Ok(admitted)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn breaker(pool: ConnectionPool) -> Arc<Breaker> {
        Arc::new(Breaker::new(&pool))
    }

    #[tokio::test]
    async fn requests_over_the_limit_are_refused_until_one_finishes() {
        let b = breaker(ConnectionPool {
            http2_max_requests: Some(2),
            ..ConnectionPool::default()
        });
        let one = b.admit(false).await.expect("first");
        let _two = b.admit(false).await.expect("second");
        assert_eq!(b.admit(false).await.err(), Some(Overflow::Requests));
        drop(one);
        assert!(b.admit(false).await.is_ok(), "a slot was given back");
        assert_eq!(b.overflows(), (1, 0));
    }

    #[tokio::test]
    async fn http1_requests_wait_for_a_connection_up_to_the_pending_limit() {
        // Istio's circuit-breaking task: one connection, one pending request.
        let b = breaker(ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..ConnectionPool::default()
        });
        let first = b.admit(true).await.expect("takes the connection");
        let waiter = tokio::spawn({
            let b = b.clone();
            async move { b.admit(true).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(
            b.admit(true).await.err(),
            Some(Overflow::Pending),
            "the third overflows at once"
        );
        assert!(
            b.admit(false).await.is_ok(),
            "HTTP/2 requests need no connection slot"
        );
        drop(first);
        waiter
            .await
            .expect("task")
            .expect("the pending request gets the connection");
        assert_eq!(b.pending.load(Ordering::Relaxed), 0);
        assert_eq!(b.active.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn a_cancelled_wait_gives_its_pending_slot_back() {
        let b = breaker(ConnectionPool {
            max_connections: Some(1),
            http1_max_pending_requests: Some(1),
            ..ConnectionPool::default()
        });
        let _first = b.admit(true).await.expect("connection");
        let cancelled = tokio::time::timeout(Duration::from_millis(10), b.admit(true)).await;
        assert!(cancelled.is_err(), "waited");
        assert_eq!(
            (
                b.pending.load(Ordering::Relaxed),
                b.active.load(Ordering::Relaxed)
            ),
            (0, 1)
        );
    }
}
