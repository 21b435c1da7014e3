//! Which of fwrepo's own QoS 1 publishes the broker acknowledged (PUBACK). rumqttc gives a
//! publish its packet id only when its event loop takes the request, and reports that as
//! `Outgoing::Publish(pkid)`, in the order the requests were queued; so every publish is
//! queued together with its entry here (under one lock), and the entries take their packet
//! ids in the same order. A publish that is sent again after a reconnect keeps its packet id;
//! one whose id is still in flight waits (`Outgoing::AwaitAck`) and goes out when that id is
//! acknowledged. When the broker starts a new session, rumqttc drops what it had not seen
//! acknowledged: those entries are dropped unconfirmed, so what waited on them is done again
//! (an unacknowledged gateway message is delivered again). Pure: events in, tokens out.

use std::collections::{HashMap, VecDeque};

/// The publishes in flight and what each one's acknowledgement completes (`T`; `None` for a
/// publish nobody waits on).
pub(super) struct Confirms<T> {
    /// Queued, without a packet id yet, in the order queued.
    queued: VecDeque<Option<T>>,
    /// Sent (or to be sent again after a reconnect), by packet id.
    in_flight: HashMap<u16, Option<T>>,
    /// A publish whose packet id was still in flight when its turn came.
    waiting: Option<(u16, Option<T>)>,
    /// How many of `queued` rumqttc held in its own queue at the last connection error: a
    /// new broker session drops them.
    held_at_error: usize,
}

impl<T> Default for Confirms<T> {
    fn default() -> Self {
        Confirms {
            queued: VecDeque::new(),
            in_flight: HashMap::new(),
            waiting: None,
            held_at_error: 0,
        }
    }
}

impl<T> Confirms<T> {
    /// A publish was queued (call with the queueing, under the same lock).
    pub(super) fn queued(&mut self, token: Option<T>) {
        self.queued.push_back(token);
    }

    /// `Outgoing::Publish(pkid)`: the next queued publish took `pkid`, unless `pkid` is a
    /// publish sent again.
    pub(super) fn sent(&mut self, pkid: u16) {
        // Packet id 0: a QoS 0 publish, which never waits for a PUBACK and has no entry.
        if pkid == 0 || self.in_flight.contains_key(&pkid) {
            return;
        }
        if let Some(token) = self.queued.pop_front() {
            self.held_at_error = self.held_at_error.saturating_sub(1);
            self.in_flight.insert(pkid, token);
        }
    }

    /// `Outgoing::AwaitAck(pkid)`: the next queued publish waits for `pkid` to be free.
    pub(super) fn collided(&mut self, pkid: u16) {
        if let Some(token) = self.queued.pop_front() {
            self.held_at_error = self.held_at_error.saturating_sub(1);
            self.waiting = Some((pkid, token));
        }
    }

    /// PUBACK `pkid`: returns what it completes. A publish waiting for `pkid` goes out now.
    pub(super) fn acked(&mut self, pkid: u16) -> Option<T> {
        let done = self.in_flight.remove(&pkid).flatten();
        if self.waiting.as_ref().is_some_and(|(p, _)| *p == pkid)
            && let Some((p, token)) = self.waiting.take()
        {
            self.in_flight.insert(p, token);
        }
        done
    }

    /// The connection failed; rumqttc now holds `unsent` publishes that never had a packet id
    /// (the first of `queued`), besides those in flight.
    pub(super) fn failed(&mut self, unsent: usize) {
        self.held_at_error = unsent.min(self.queued.len());
    }

    /// CONNACK. Without the old session the broker forgot what was in flight, and rumqttc
    /// dropped what it held: returns the tokens that will never be confirmed.
    pub(super) fn connected(&mut self, session_present: bool) -> Vec<T> {
        if session_present {
            self.held_at_error = 0;
            return Vec::new();
        }
        let mut lost: Vec<T> = self.in_flight.drain().filter_map(|(_, t)| t).collect();
        lost.extend(self.waiting.take().and_then(|(_, t)| t));
        let held = std::mem::take(&mut self.held_at_error);
        lost.extend(self.queued.drain(..held).flatten());
        lost
    }

    /// Publishes not yet acknowledged.
    #[cfg(test)]
    pub(super) fn pending(&self) -> usize {
        self.queued.len() + self.in_flight.len() + usize::from(self.waiting.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_puback_confirms_the_publish_that_took_its_packet_id() {
        let mut c = Confirms::default();
        c.queued(Some("a"));
        c.queued(None);
        c.queued(Some("c"));
        c.sent(0); // a QoS 0 publish of someone else's
        c.sent(1);
        c.sent(2);
        assert_eq!(c.acked(2), None, "an untracked publish confirms nothing");
        c.sent(3);
        assert_eq!(c.acked(3), Some("c"));
        assert_eq!(c.acked(1), Some("a"));
        assert_eq!(c.acked(1), None, "a second PUBACK confirms nothing");
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn a_publish_sent_again_after_a_reconnect_keeps_its_entry() {
        let mut c = Confirms::default();
        c.queued(Some("a"));
        c.sent(7);
        c.queued(Some("b"));
        c.failed(1);
        assert!(c.connected(true).is_empty());
        c.sent(7); // "a" again, same packet id
        c.sent(8); // "b"
        assert_eq!(c.acked(8), Some("b"));
        assert_eq!(c.acked(7), Some("a"));
    }

    #[test]
    fn a_publish_waiting_for_its_packet_id_is_confirmed_by_the_next_puback_of_that_id() {
        let mut c = Confirms::default();
        c.queued(Some("old"));
        c.sent(5);
        c.queued(Some("new"));
        c.collided(5);
        // rumqttc reports the waiting publish as sent once 5 is free, before or after the
        // PUBACK event: either way it is the one in flight afterwards.
        c.sent(5);
        assert_eq!(c.acked(5), Some("old"));
        c.sent(5);
        assert_eq!(c.acked(5), Some("new"));
        assert_eq!(c.pending(), 0);
    }

    #[test]
    fn a_new_broker_session_drops_what_was_in_flight_or_held_but_not_what_came_after() {
        let mut c = Confirms::default();
        c.queued(Some("in flight"));
        c.sent(1);
        c.queued(Some("held"));
        c.failed(1);
        c.queued(Some("after the error"));
        let mut lost = c.connected(false);
        lost.sort();
        assert_eq!(lost, vec!["held", "in flight"]);
        c.sent(1);
        assert_eq!(c.acked(1), Some("after the error"));
        assert_eq!(c.pending(), 0);
    }
}
