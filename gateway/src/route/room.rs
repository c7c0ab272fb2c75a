//! A pool's wait room: requests that found every worker at its cap wait here, and each
//! released slot is offered to the waiting request of the least-served tenant — weighted
//! virtual counters ([`crate::engine::fair`]) over the weighted tokens each tenant was
//! granted since the room was last empty (ties in arrival order). A tenant that joins
//! while others wait is lifted to the smallest of their counters, so it cannot bank
//! credit, and is served within a slot or two; one that bought three times the rate gets
//! three times the slots while both wait. While anyone waits, new requests join the room
//! rather than take a freed slot first.
//!
//! A wake is an offer, not a slot: the woken request picks a worker itself, and if that
//! fails (another request took the slot, or its free worker is one it must avoid) it
//! waits again; a request that had excluded workers passes the offer on to a later
//! arrival, so the offers along a chain always end.

use crate::engine::fair::{Fair, InRun, Tenanted};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::sync::Notify;

/// Who is waiting: the tenant (the account its fair share is counted in, see
/// [`crate::engine::fair::account`]), its weight, and the request's weighted tokens.
#[derive(Debug, Clone)]
pub struct Who {
    pub tenant: Arc<str>,
    pub weight: f64,
    pub cost: f64,
}

struct Entry {
    id: u64,
    tenant: Arc<str>,
    weight: f64,
    notify: Arc<Notify>,
    /// Holds an offer it has not yet answered.
    woken: bool,
}

impl Tenanted for Entry {
    fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
    fn weight(&self) -> f64 {
        self.weight
    }
}

#[derive(Default)]
struct Inner {
    fair: Fair,
    next_id: u64,
    /// In arrival order.
    entries: Vec<Entry>,
}

/// The wait room of one pool.
#[derive(Default)]
pub struct Room {
    inner: Mutex<Inner>,
    len: AtomicUsize,
}

impl Room {
    /// Requests waiting.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data; keep serving.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the room unless `depth` requests already wait.
    pub fn join(&self, who: &Who, depth: usize) -> Option<Ticket<'_>> {
        let mut g = self.lock();
        if g.entries.len() >= depth {
            return None;
        }
        let Inner {
            fair,
            next_id,
            entries,
        } = &mut *g;
        fair.arrive(&who.tenant, entries.iter().map(|e| &e.tenant));
        let id = *next_id;
        *next_id += 1;
        let notify = Arc::new(Notify::new());
        entries.push(Entry {
            id,
            tenant: who.tenant.clone(),
            weight: who.weight,
            notify: notify.clone(),
            woken: false,
        });
        self.len.store(entries.len(), Ordering::Release);
        Some(Ticket {
            room: self,
            id,
            notify,
            who: who.clone(),
            served: false,
        })
    }

    /// Offers a freed slot to the best waiter without an offer (arrived after `after`,
    /// when given).
    pub fn wake_next(&self) {
        Self::offer(&mut self.lock(), None);
    }

    fn offer(g: &mut Inner, after: Option<u64>) {
        let open = |e: &&Entry| !e.woken && after.is_none_or(|a| e.id > a);
        let Some(k) = g.fair.pick(g.entries.iter().filter(open), &InRun::new()) else {
            return;
        };
        if let Some(e) = g.entries.iter_mut().filter(|e| open(&&**e)).nth(k) {
            e.woken = true;
            e.notify.notify_one();
        }
    }
}

/// A place in the room; leaving (drop) gives up the place, and passes on an offer it
/// held without taking.
pub struct Ticket<'a> {
    room: &'a Room,
    id: u64,
    notify: Arc<Notify>,
    who: Who,
    served: bool,
}

impl Ticket<'_> {
    /// Waits for an offer.
    pub async fn offered(&self) {
        self.notify.notified().await;
    }

    /// The offer was taken: the tenant is charged the request's weighted tokens.
    pub fn served(mut self) {
        let mut g = self.room.lock();
        g.fair
            .charge(&self.who.tenant, self.who.cost, self.who.weight);
        self.served = true;
    }

    /// The offer found no slot: wait for the next. With `pass_on` (the request avoids
    /// some workers, so the free slot may be one others can use) the offer goes to a
    /// later arrival.
    pub fn decline(&self, pass_on: bool) {
        let mut g = self.room.lock();
        if let Some(e) = g.entries.iter_mut().find(|e| e.id == self.id) {
            e.woken = false;
        }
        if pass_on {
            Room::offer(&mut g, Some(self.id));
        }
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        let mut g = self.room.lock();
        let Some(i) = g.entries.iter().position(|e| e.id == self.id) else {
            return;
        };
        let e = g.entries.remove(i);
        self.room.len.store(g.entries.len(), Ordering::Release);
        if e.woken && !self.served {
            // Timed out or cancelled holding an offer: someone else may take the slot.
            Room::offer(&mut g, None);
        }
        if g.entries.is_empty() {
            g.fair.reset();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn who(t: &str, weight: f64) -> Who {
        Who {
            tenant: t.into(),
            weight,
            cost: 100.0,
        }
    }

    /// The tenant of the ticket that holds an offer now (and takes it).
    fn take<'a>(tickets: &mut Vec<(String, Ticket<'a>)>) -> String {
        let i = {
            let g = tickets[0].1.room.lock();
            let id = g.entries.iter().find(|e| e.woken).expect("an offer").id;
            tickets
                .iter()
                .position(|(_, t)| t.id == id)
                .expect("its ticket")
        };
        let (tenant, t) = tickets.remove(i);
        t.served();
        tenant
    }

    #[test]
    fn offers_go_to_the_least_served_tenant_in_arrival_order_on_ties() {
        let room = Room::default();
        let mut tickets = Vec::new();
        for t in ["a", "a", "a", "b"] {
            tickets.push((t.to_string(), room.join(&who(t, 1.0), 10).unwrap()));
        }
        assert_eq!(room.len(), 4);
        let mut order = Vec::new();
        while !tickets.is_empty() {
            room.wake_next();
            order.push(take(&mut tickets));
        }
        // b joined last but is served second: a's first took 100 weighted tokens.
        assert_eq!(order, ["a", "b", "a", "a"]);
        assert!(room.is_empty());
    }

    #[test]
    fn slots_follow_the_weights_and_the_room_is_bounded() {
        let room = Room::default();
        let mut tickets = Vec::new();
        for _ in 0..6 {
            tickets.push(("a".to_string(), room.join(&who("a", 1.0), 12).unwrap()));
        }
        for _ in 0..6 {
            tickets.push(("b".to_string(), room.join(&who("b", 3.0), 12).unwrap()));
        }
        assert!(room.join(&who("c", 1.0), 12).is_none(), "the room is full");
        let mut first8 = Vec::new();
        for _ in 0..8 {
            room.wake_next();
            first8.push(take(&mut tickets));
        }
        let b = first8.iter().filter(|t| *t == "b").count();
        assert_eq!(b, 6, "3:1 weights: {first8:?}");
    }

    #[test]
    fn an_offer_is_passed_on_when_declined_or_dropped() {
        let room = Room::default();
        let t1 = room.join(&who("a", 1.0), 10).unwrap();
        let t2 = room.join(&who("b", 1.0), 10).unwrap();
        room.wake_next();
        let woken = |id| room.lock().entries.iter().any(|e| e.id == id && e.woken);
        assert!(woken(t1.id) && !woken(t2.id));
        // Declined without passing: nobody holds an offer.
        t1.decline(false);
        assert!(!woken(t1.id) && !woken(t2.id));
        // Declined with passing: the later arrival gets it.
        room.wake_next();
        t1.decline(true);
        assert!(!woken(t1.id) && woken(t2.id));
        // The holder leaves without taking it: back to the other.
        let id1 = t1.id;
        drop(t2);
        assert!(woken(id1));
        drop(t1);
        assert!(room.is_empty());
        assert_eq!(room.lock().fair.counter("a"), 0.0, "reset when empty");
    }
}
