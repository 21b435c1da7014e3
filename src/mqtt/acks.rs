//! Manual acknowledgements, sent in the order the messages came: a gateway's OTA message is
//! acknowledged only once the OTA service recorded it, and PUBACKs must not overtake each
//! other (rumqttd closes a connection that acknowledges out of order). A message that could
//! not be recorded holds every later acknowledgement until the session reconnects; the broker
//! then delivers all of them again (persistent session), and the duplicates are harmless
//! (device reports are idempotent, task events pass the order-independent state machine).

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use rumqttc::{AsyncClient, Publish, QoS};

use super::MqttStatus;
use crate::lock;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mark {
    Pending,
    Done,
    Withheld,
}

#[derive(Default)]
struct Queue {
    /// Connection the entries belong to (packet ids mean nothing on the next one).
    generation: u64,
    next: u64,
    entries: VecDeque<(u64, Publish, Mark)>,
}

/// The session's acknowledgements in arrival order. Cheap to clone.
#[derive(Clone)]
pub(super) struct Acks {
    queue: Arc<Mutex<Queue>>,
    /// To the task that sends them: in order, and never dropped for a full request queue
    /// (a lost PUBACK would hold the broker's window for this session forever).
    send: tokio::sync::mpsc::UnboundedSender<Publish>,
    status: Arc<MqttStatus>,
}

impl Acks {
    pub(super) fn new(client: AsyncClient, status: Arc<MqttStatus>) -> Acks {
        let (send, mut ready) = tokio::sync::mpsc::unbounded_channel::<Publish>();
        tokio::spawn(async move {
            while let Some(p) = ready.recv().await {
                if client.ack(&p).await.is_err() {
                    break;
                }
            }
        });
        Acks {
            queue: Arc::default(),
            send,
            status,
        }
    }

    /// A new connection: what was waiting is delivered again by the broker.
    pub(super) fn reset(&self) {
        let mut q = lock(&self.queue);
        q.generation += 1;
        q.entries.clear();
    }

    /// Whether every message taken in was acknowledged (none waits to be recorded).
    pub(super) fn idle(&self) -> bool {
        lock(&self.queue).entries.is_empty()
    }

    /// Takes `p` in; the returned acknowledgement marks it done (or withheld when dropped
    /// undone). QoS 0 messages need none.
    pub(super) fn track(&self, p: &Publish) -> crate::domain::Ack {
        if p.qos == QoS::AtMostOnce {
            return crate::domain::Ack::default();
        }
        let (generation, seq) = {
            let mut q = lock(&self.queue);
            let seq = q.next;
            q.next += 1;
            q.entries.push_back((seq, p.clone(), Mark::Pending));
            (q.generation, seq)
        };
        let this = self.clone();
        crate::domain::Ack::new(move |recorded| this.mark(generation, seq, recorded))
    }

    fn mark(&self, generation: u64, seq: u64, recorded: bool) {
        let mut q = lock(&self.queue);
        if q.generation != generation {
            return;
        }
        if let Some(e) = q.entries.iter_mut().find(|e| e.0 == seq) {
            e.2 = if recorded { Mark::Done } else { Mark::Withheld };
        }
        if !recorded {
            self.status.withheld.fetch_add(1, Ordering::Relaxed);
            self.status.withheld_total.fetch_add(1, Ordering::Relaxed);
        }
        while q.entries.front().is_some_and(|e| e.2 == Mark::Done) {
            if let Some((_, p, _)) = q.entries.pop_front() {
                let _ = self.send.send(p);
            }
        }
    }
}
