//! Operators' actions on a rollout (start, pause, resume, approve, cancel), through the state
//! machine.

use super::*;

impl RolloutService {
    /// An operator's action; the state machine decides whether it applies. On a replica that
    /// does not drive rollouts (another holds the scheduling lease) it is decided on the
    /// stored rollouts and stored; the driving replica reads it within 2 s. When another
    /// replica changed the rollout first, the action is decided again on the fresh copy.
    pub async fn action(&self, id: &str, action: Action) -> Result<RolloutView, RolloutError> {
        let drives = self.drives();
        let _one = match drives {
            true => None,
            false => Some(self.inner.acting.lock().await),
        };
        for _ in 0..3 {
            if !drives {
                let loaded = Self::load_active(&self.inner.stores).await?;
                *lock(&self.inner.active) = loaded;
            }
            // Read first: the decision holds the lock and makes no I/O.
            let driven = lock(&self.inner.active).contains_key(id);
            let stored = match driven {
                true => None,
                false => Some(self.stored(id).await?),
            };
            let decided = self.decide(id, action, stored, Utc::now());
            // Stored before the answer (which the access gate makes durable).
            let written = self.store_writes().await;
            if !drives {
                lock(&self.inner.active).clear();
            }
            let view = decided?;
            if written?.iter().any(|s| s == id) {
                continue;
            }
            tracing::info!(rollout_id = %id, action = action.as_str(), status = ?view.rollout.status(), "rollout action");
            let _ = self.inner.changes.send(view.clone());
            self.inner.wake.notify_one();
            return Ok(view);
        }
        Err(RolloutError::Conflict(format!(
            "rollout {id} kept changing through other replicas; try again"
        )))
    }

    /// Decides `action` on rollout `id` (memory's copy, else `stored`) and queues its writes.
    fn decide(
        &self,
        id: &str,
        action: Action,
        stored: Option<Rollout>,
        now: DateTime<Utc>,
    ) -> Result<RolloutView, RolloutError> {
        let not_found = || RolloutError::NotFound(id.to_string());
        let view = {
            let mut active = lock(&self.inner.active);
            if action == Action::Start {
                let mut r = match active.get(id) {
                    Some(a) => a.rollout.clone(),
                    None => stored.clone().ok_or_else(not_found)?,
                };
                let step = machine::next_for(&r, Input::Act(action))?;
                let mut members = self.resolve_members(&r, &HashSet::new());
                if members.is_empty() {
                    return Err(RolloutError::Validation(
                        "the target holds no gateway with a device that has a package".into(),
                    ));
                }
                let sns: HashSet<&str> = members
                    .iter()
                    .flat_map(|m| {
                        std::iter::once(m.gateway_sn.as_str())
                            .chain(m.devices.iter().map(|d| d.sn.as_str()))
                    })
                    .collect();
                if let Some(c) = self.conflict(&active, id, &sns) {
                    return Err(RolloutError::Conflict(c));
                }
                members.sort_by(|a, b| a.order.cmp(&b.order));
                let sizes = model::stage_sizes(&r.definition.stages, members.len());
                for (i, m) in members.iter_mut().enumerate() {
                    m.stage = sizes.iter().position(|&s| i < s).unwrap_or(sizes.len() - 1);
                }
                r.stage_sizes = sizes;
                if let Some(step) = &step {
                    machine::apply(&mut r, step, now);
                }
                let mut a = Active {
                    rollout: r,
                    members,
                    next_slot: now,
                    last_refresh: now,
                    last_sample: now,
                };
                a.rollout.sample(&a.counts(), now);
                self.persist(&a.rollout, &a.members.iter().collect::<Vec<_>>(), true);
                let view = view_of(&a.rollout, &a.members, now);
                active.insert(id.to_string(), a);
                view
            } else {
                if action == Action::Resume {
                    // Another rollout may have taken some of its devices meanwhile.
                    let held: Vec<String> = active
                        .get(id)
                        .map(|a| a.holds().map(str::to_string).collect())
                        .unwrap_or_default();
                    let set: HashSet<&str> = held.iter().map(String::as_str).collect();
                    if let Some(c) = self.conflict(&active, id, &set) {
                        return Err(RolloutError::Conflict(c));
                    }
                }
                let Some(a) = active.get_mut(id) else {
                    let r = stored.clone().ok_or_else(not_found)?;
                    return Err(machine::Refused {
                        action,
                        status: r.status(),
                    }
                    .into());
                };
                let step =
                    machine::next_for(&a.rollout, Input::Act(action))?.ok_or(machine::Refused {
                        action,
                        status: a.rollout.status(),
                    })?;
                if step.acknowledge_failures {
                    a.rollout.acknowledged_failed = model::count(a.members.iter())
                        .get(&DeviceState::Failed)
                        .copied()
                        .unwrap_or(0);
                }
                if step.cancel_members {
                    for m in a
                        .members
                        .iter_mut()
                        .filter(|m| !m.state.is_final() && m.state != DeviceState::InFlight)
                    {
                        m.set_state(DeviceState::Canceled, now);
                    }
                }
                machine::apply(&mut a.rollout, &step, now);
                a.rollout.sample(&model::count(a.members.iter()), now);
                self.persist(&a.rollout, &a.members.iter().collect::<Vec<_>>(), true);
                view_of(&a.rollout, &a.members, now)
            }
        };
        Ok(view)
    }
}
