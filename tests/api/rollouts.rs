//! Staged rollouts end to end: the real server, the built-in simulator's fleet (docks with
//! aircraft) on the embedded broker, and the rollout API as an operator uses it.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

fn gw(prefix: &str, i: usize) -> String {
    format!("{prefix}{i:04}")
}

fn models(s: &mut fwrepo::config::Settings) {
    s.models = fwrepo::devices::ModelMap::from_table(Some(
        &toml::from_str("\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n").unwrap(),
    ))
    .unwrap();
    s.ota.reply_timeout = Duration::from_secs(5);
}

/// Uploads the release: a dock and an aircraft package (one named by id, one by model).
async fn release(app: &TestApp) -> Value {
    let dock = app.upload_ok("Dock_2.0.0.zip", payload(300_000, 11)).await;
    app.upload_ok("M30_2.0.0.zip", payload(200_000, 12)).await;
    json!([{"firmware_id": dock["id"]}, {"model": "M30", "product_version": "2.0.0"}])
}

async fn wait_fleet_online(app: &TestApp, prefix: &str, n: usize) {
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let (_, d) = app
                .get_json("/api/v1/devices?seen_within_s=30&limit=500")
                .await;
            d["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| {
                    x["sn"].as_str().unwrap().starts_with(prefix)
                        && x["online"] == true
                        && x["model"].is_string()
                        && (x["gateway_sn"].is_string() || x["child_sn"].is_string())
                })
                .count()
                == 2 * n
        })
        .await,
        "the simulated fleet never came online"
    );
}

async fn post(app: &TestApp, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut rb = app.client.post(app.url(path)).json(&body);
    if let Some(k) = key {
        rb = rb.header("idempotency-key", k);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

/// `POST /api/v1/rollouts/{id}/{action}`.
async fn act(app: &TestApp, id: &str, action: &str) -> (u16, Value) {
    post(
        app,
        &format!("/api/v1/rollouts/{id}/{action}"),
        json!({}),
        None,
    )
    .await
}

/// Creates a rollout and starts it; returns its id.
async fn start_rollout(app: &TestApp, body: Value) -> String {
    let (status, r) = post(app, "/api/v1/rollouts", body, None).await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    let (status, started) = post(
        app,
        &format!("/api/v1/rollouts/{id}/start"),
        json!({}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{started}");
    id
}

async fn wait_status(app: &TestApp, id: &str, want: &[&str], secs: u64) -> Value {
    let mut last = Value::Null;
    for _ in 0..secs * 5 {
        let (_, r) = app.get_json(&format!("/api/v1/rollouts/{id}")).await;
        if want.iter().any(|w| r["status"] == *w) {
            return r;
        }
        last = r;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("rollout never reached {want:?}: {last}");
}

async fn devices_of(app: &TestApp, id: &str) -> Vec<Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    loop {
        let (status, page) = app
            .get_json(&format!(
                "/api/v1/rollouts/{id}/devices?limit=7&cursor={cursor}"
            ))
            .await;
        assert_eq!(status, 200, "{page}");
        out.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(c) => cursor = c.to_string(),
            None => return out,
        }
    }
}

async fn tasks_of(app: &TestApp, gateway: &str) -> Vec<Value> {
    let (_, page) = app
        .get_json(&format!("/api/v1/ota?gateway_sn={gateway}&limit=100"))
        .await;
    page["items"].as_array().unwrap().clone()
}

fn ts(v: &Value) -> chrono::DateTime<chrono::Utc> {
    v.as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn stages_in_order_pairs_together_caps_hold_offline_ends_unreachable() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let (prefix, sim) = fleet(&app.mqtt_addr(), 19, &[]).await;
    wait_fleet_online(&app, &prefix, 19).await;
    let mut target: Vec<String> = (1..=19).map(|i| gw(&prefix, i)).collect();
    let offline = format!("{prefix}OFF");
    target.push(offline.clone());
    let body = json!({
        "name": "fleet 2.0.0", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 25}, {"percent": 60}, {"percent": 100}],
        "max_in_flight": 4, "rate_per_minute": null, "device_timeout_s": 4, "min_sample": 2
    });
    let (status, r) = post(&app, "/api/v1/rollouts", body.clone(), Some("k-1")).await;
    assert_eq!(status, 201, "{r}");
    assert_eq!(r["status"], "draft");
    let id = r["id"].as_str().unwrap().to_string();
    // Idempotency-Key: same body → the original answer; another body → 422.
    let (status, again) = post(&app, "/api/v1/rollouts", body.clone(), Some("k-1")).await;
    assert_eq!((status, &again["id"]), (201, &r["id"]));
    let mut other = body.clone();
    other["name"] = json!("other");
    let (status, e) = post(&app, "/api/v1/rollouts", other, Some("k-1")).await;
    assert_eq!(
        (status, e["error"].as_str()),
        (422, Some("idempotency_key_reused"))
    );

    let (status, started) = act(&app, &id, "start").await;
    assert_eq!(status, 200, "{started}");
    assert_eq!(started["stages"][0]["gateways"], 5);
    assert_eq!(started["stages"][1]["gateways"], 12);
    assert_eq!(started["stages"][2]["gateways"], 20);
    let done = wait_status(&app, &id, &["completed", "paused"], 90).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["ok"], 38, "{done}");
    // The never-seen gateway waited, then ended unreachable, without pausing anything.
    assert_eq!(done["counts"]["unreachable"], 1, "{done}");

    let rows = devices_of(&app, &id).await;
    assert_eq!(rows.len(), 39);
    let (status, unreachable) = app
        .get_json(&format!("/api/v1/rollouts/{id}/devices?state=unreachable"))
        .await;
    assert_eq!(status, 200);
    assert_eq!(unreachable["items"][0]["sn"], offline.as_str());

    // One OTA task per gateway, dock and aircraft in the same ota_create.
    let mut spans = Vec::new();
    let mut created_by_stage: Vec<Vec<chrono::DateTime<chrono::Utc>>> = vec![Vec::new(); 3];
    for i in 1..=19 {
        let g = gw(&prefix, i);
        let tasks = tasks_of(&app, &g).await;
        assert_eq!(tasks.len(), 1, "{g} was dispatched {} times", tasks.len());
        let t = &tasks[0];
        assert_eq!(t["status"], "ok");
        let sns: Vec<&str> = t["devices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| d["sn"].as_str().unwrap())
            .collect();
        assert_eq!(sns.len(), 2, "pair upgraded together: {sns:?}");
        spans.push((ts(&t["created_at"]), ts(&t["finished_at"])));
        let stage = rows.iter().find(|r| r["sn"] == g.as_str()).unwrap()["stage"]
            .as_u64()
            .unwrap();
        created_by_stage[stage as usize].push(ts(&t["created_at"]));
    }
    // The in-flight cap held: never more than 4 tasks open at once.
    for (start, _) in &spans {
        let open = spans
            .iter()
            .filter(|(s, f)| s <= start && f > start)
            .count();
        assert!(open <= 4, "{open} tasks in flight at {start}");
    }
    // Stages in order: every task of a stage was created after every task of the one before.
    for k in 1..3 {
        if let (Some(prev), Some(next)) = (
            created_by_stage[k - 1].iter().max(),
            created_by_stage[k].iter().min(),
        ) {
            assert!(
                prev <= next,
                "stage {k} started before stage {} was dispatched",
                k - 1
            );
        }
    }
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("fwrepo_rollouts_active{status=\"running\"} 0"),
        "{metrics}"
    );
    let (_, timeline) = app
        .get_json(&format!("/api/v1/rollouts/{id}/timeline"))
        .await;
    assert!(
        timeline["items"].as_array().unwrap().len() >= 2,
        "{timeline}"
    );
    // A completed rollout cannot be resumed.
    let (status, e) = act(&app, &id, "resume").await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("invalid_transition"))
    );
    sim.cancel();
}

#[tokio::test]
async fn rate_limit_spaces_dispatches() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let (prefix, sim) = fleet(&app.mqtt_addr(), 4, &[]).await;
    wait_fleet_online(&app, &prefix, 4).await;
    let target: Vec<String> = (1..=4).map(|i| gw(&prefix, i)).collect();
    let body = json!({"name": "slow", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 100}], "rate_per_minute": 60, "max_in_flight": 10});
    let (_, r) = post(&app, "/api/v1/rollouts", body, None).await;
    let id = r["id"].as_str().unwrap().to_string();
    // Live over SSE: a snapshot now, one per change, and the stream ends with the rollout.
    let sse = app
        .client
        .get(app.url(&format!("/api/v1/rollouts/{id}/events")))
        .send()
        .await
        .unwrap();
    assert_eq!(sse.headers()["content-type"], "text/event-stream");
    let reader = tokio::spawn(async move { sse.text().await.unwrap() });
    act(&app, &id, "start").await;
    let done = wait_status(&app, &id, &["completed", "paused"], 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    let text = tokio::time::timeout(Duration::from_secs(10), reader)
        .await
        .expect("the SSE stream did not end")
        .unwrap();
    let events: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect();
    assert_eq!(events.first().unwrap()["status"], "draft");
    assert_eq!(events.last().unwrap()["status"], "completed");
    assert!(events.len() >= 4, "{} events", events.len());
    let mut created: Vec<_> = Vec::new();
    for i in 1..=4 {
        created.push(ts(&tasks_of(&app, &gw(&prefix, i)).await[0]["created_at"]));
    }
    created.sort();
    // 60 per minute with ±20 % jitter: at least 0.8 s between two dispatches.
    for w in created.windows(2) {
        let gap = (w[1] - w[0]).num_milliseconds();
        assert!(gap >= 750, "dispatches {gap} ms apart");
    }
    sim.cancel();
}

#[tokio::test]
async fn error_threshold_pauses_and_retries_turn_failures_into_ok() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    // Half the docks fail their upgrade: the error threshold pauses the rollout once
    // min_sample devices are final; tasks in flight still finish.
    let (bad, sim_bad) = fleet(
        &app.mqtt_addr(),
        6,
        &["--fail", "upgrade", "--fail-rate", "0.5"],
    )
    .await;
    wait_fleet_online(&app, &bad, 6).await;
    let target: Vec<String> = (1..=6).map(|i| gw(&bad, i)).collect();
    let body = json!({"name": "bad", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 100}], "rate_per_minute": null, "max_retries": 0,
        "min_sample": 4, "error_threshold": 10, "max_in_flight": 6});
    let id = start_rollout(&app, body).await;
    let paused = wait_status(&app, &id, &["paused", "completed"], 60).await;
    assert_eq!(paused["status"], "paused", "{paused}");
    assert!(
        paused["pause_reason"]
            .as_str()
            .unwrap()
            .contains("error_threshold"),
        "{paused}"
    );
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let (_, r) = app.get_json(&format!("/api/v1/rollouts/{id}")).await;
            r["counts"]["in_flight"].is_null()
        })
        .await,
        "tasks in flight did not finish"
    );
    let (_, r) = app.get_json(&format!("/api/v1/rollouts/{id}")).await;
    let failed = r["counts"]["failed"].as_u64().unwrap();
    let ok = r["counts"]["ok"].as_u64().unwrap_or(0);
    assert!(failed >= 2 && ok + failed == 12, "{r}");
    // Resuming acknowledges those failures: it goes on (here: nothing left, so it completes)
    // instead of pausing again at once.
    let (status, resumed) = act(&app, &id, "resume").await;
    assert_eq!(status, 200, "{resumed}");
    let done = wait_status(&app, &id, &["completed", "paused"], 30).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["failed"], failed, "{done}");
    sim_bad.cancel();

    // Half the jobs fail: retries with a short backoff get every gateway to ok.
    let (flaky, sim_flaky) = fleet(
        &app.mqtt_addr(),
        4,
        &["--fail", "download", "--fail-rate", "0.5"],
    )
    .await;
    wait_fleet_online(&app, &flaky, 4).await;
    let target: Vec<String> = (1..=4).map(|i| gw(&flaky, i)).collect();
    let body = json!({"name": "flaky", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 100}], "rate_per_minute": null, "max_retries": 6,
        "retry_backoff_s": 1, "error_threshold": 100, "success_threshold": 100});
    let id = start_rollout(&app, body).await;
    let done = wait_status(&app, &id, &["completed", "paused"], 120).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["ok"], 8, "{done}");
    let mut attempts = 0;
    for i in 1..=4 {
        attempts += tasks_of(&app, &gw(&flaky, i)).await.len();
    }
    assert!(attempts > 4, "no failure was retried ({attempts} tasks)");
    sim_flaky.cancel();
}

/// The body of a rollout over `target` with `firmware` in two stages (one gateway of four,
/// then the rest) that waits for approval between them.
fn gated_body(firmware: &Value, target: &[String]) -> Value {
    json!({"name": "gated", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 25}, {"percent": 100}], "rate_per_minute": null,
        "auto_advance": false})
}

/// A server with the release uploaded and four simulated docks (with aircraft, started with
/// `sim_args`) online, and the body of a gated rollout over them.
struct GatedFleet {
    app: TestApp,
    firmware: Value,
    body: Value,
    sim: tokio_util::sync::CancellationToken,
}

async fn gated_fleet(sim_args: &[&str]) -> GatedFleet {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let (prefix, sim) = fleet(&app.mqtt_addr(), 4, sim_args).await;
    wait_fleet_online(&app, &prefix, 4).await;
    let target: Vec<String> = (1..=4).map(|i| gw(&prefix, i)).collect();
    let body = gated_body(&firmware, &target);
    GatedFleet {
        app,
        firmware,
        body,
        sim,
    }
}

/// Starts the gated rollout and waits until stage 1 is done and it waits for approval.
async fn start_gated(g: &GatedFleet) -> String {
    let id = start_rollout(&g.app, g.body.clone()).await;
    let waiting = wait_status(
        &g.app,
        &id,
        &["waiting_approval", "paused", "completed"],
        60,
    )
    .await;
    assert_eq!(waiting["status"], "waiting_approval", "{waiting}");
    id
}

#[tokio::test]
async fn bad_rollout_input_is_refused_and_nothing_is_stored() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let prefix = sn("BAD")[..9].to_string();
    let target: Vec<String> = (1..=4).map(|i| gw(&prefix, i)).collect();
    let base = gated_body(&firmware, &target);
    for (patch, code) in [
        (
            json!({"stages": [{"percent": 50}, {"percent": 50}]}),
            "validation_failed",
        ),
        (
            json!({"stages": [{"percent": 10}, {"percent": 90}]}),
            "validation_failed",
        ),
        (json!({"success_threshold": 101}), "validation_failed"),
        (json!({"error_threshold": -1}), "validation_failed"),
        (json!({"rate_per_minute": 0}), "validation_failed"),
        (json!({"target": {"gateway_sns": []}}), "validation_failed"),
        (
            json!({"firmware": [{"firmware_id": "01ARZ3NDEKTSV4RRFFQ69G5FAV"}]}),
            "not_found",
        ),
        (
            json!({"firmware": [{"model": "Nope", "product_version": "1.0"}]}),
            "not_found",
        ),
        (json!({"surprise": 1}), "invalid_request"),
    ] {
        let mut body = base.clone();
        for (k, v) in patch.as_object().unwrap() {
            body[k] = v.clone();
        }
        let (status, e) = post(&app, "/api/v1/rollouts", body, None).await;
        assert_eq!(e["error"], code, "{patch}: {status} {e}");
    }
    let (_, list) = app.get_json("/api/v1/rollouts").await;
    assert_eq!(list["items"].as_array().unwrap().len(), 0, "{list}");
    let (status, _) = app.get_json("/api/v1/rollouts/nope").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn a_draft_cannot_be_paused_resumed_or_approved() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let prefix = sn("DRAFT")[..9].to_string();
    let target: Vec<String> = (1..=4).map(|i| gw(&prefix, i)).collect();
    let (status, r) = post(
        &app,
        "/api/v1/rollouts",
        gated_body(&firmware, &target),
        None,
    )
    .await;
    assert_eq!(status, 201, "{r}");
    let id = r["id"].as_str().unwrap().to_string();
    for action in ["pause", "resume", "approve"] {
        let (status, e) = act(&app, &id, action).await;
        assert_eq!(
            (status, e["error"].as_str()),
            (409, Some("invalid_transition")),
            "{action} on a draft"
        );
    }
}

#[tokio::test]
async fn a_gated_rollout_waits_for_approval_after_stage_one() {
    let g = gated_fleet(&[]).await;
    let id = start_gated(&g).await;
    let (_, waiting) = g.app.get_json(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(waiting["status"], "waiting_approval", "{waiting}");
    assert_eq!(
        waiting["counts"]["ok"], 2,
        "stage 1 is one gateway: {waiting}"
    );
    assert_eq!(waiting["counts"]["pending"], 6);
    let metrics = g.app.metrics().await;
    for line in [
        "fwrepo_rollouts_active{status=\"waiting_approval\"} 1",
        "fwrepo_rollout_devices{state=\"ok\"} 2",
        "fwrepo_rollout_devices{state=\"pending\"} 6",
    ] {
        assert!(metrics.contains(line), "{line} not in {metrics}");
    }
    g.sim.cancel();
}

#[tokio::test]
async fn a_second_rollout_on_the_same_gateways_starts_only_after_the_first() {
    let g = gated_fleet(&[]).await;
    let app = &g.app;
    let id = start_gated(&g).await;
    // A second rollout touching the same gateways cannot start while this one runs.
    let (_, r2) = post(app, "/api/v1/rollouts", g.body.clone(), None).await;
    let id2 = r2["id"].as_str().unwrap().to_string();
    let (status, e) = act(app, &id2, "start").await;
    assert_eq!(
        (status, e["error"].as_str()),
        (409, Some("rollout_conflict")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains(&id), "{e}");
    // Approved, the first one runs to the end.
    let (status, _) = act(app, &id, "approve").await;
    assert_eq!(status, 200);
    let done = wait_status(app, &id, &["completed", "paused"], 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["ok"], 8);
    // The second one may start now; everything is up to date: skipped, completed.
    let (status, _) = act(app, &id2, "start").await;
    assert_eq!(status, 200);
    wait_status(app, &id2, &["waiting_approval"], 60).await;
    act(app, &id2, "approve").await;
    let skipped = wait_status(app, &id2, &["completed", "paused"], 60).await;
    assert_eq!(skipped["counts"]["skipped_up_to_date"], 8, "{skipped}");
    g.sim.cancel();
}

#[tokio::test]
async fn disabling_the_firmware_of_a_running_rollout_pauses_it_until_resumed() {
    let g = gated_fleet(&[]).await;
    let app = &g.app;
    let id = start_gated(&g).await;
    // Its firmware is in use while it runs.
    let dock_id = g.firmware[0]["firmware_id"].as_str().unwrap();
    let resp = app
        .client
        .delete(app.url(&format!("/api/v1/firmware/{dock_id}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 409);
    let e: Value = resp.json().await.unwrap();
    assert_eq!(e["error"], "firmware_in_use", "{e}");
    // Disabling its firmware (forced: stage 1's dock runs it) pauses the rollout once it runs.
    let (status, e) = post(
        app,
        &format!("/api/v1/firmware/{dock_id}/disable?force=true"),
        json!({}),
        None,
    )
    .await;
    assert_eq!(status, 200, "{e}");
    let (status, _) = act(app, &id, "approve").await;
    assert_eq!(status, 200);
    let paused = wait_status(app, &id, &["paused"], 30).await;
    assert!(
        paused["pause_reason"]
            .as_str()
            .unwrap()
            .contains("disabled"),
        "{paused}"
    );
    // Enabled again and resumed: stage 2 runs to the end.
    let (status, _) = post(
        app,
        &format!("/api/v1/firmware/{dock_id}/enable"),
        json!({}),
        None,
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = act(app, &id, "resume").await;
    assert_eq!(status, 200);
    let done = wait_status(app, &id, &["completed", "paused"], 60).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["ok"], 8);
    g.sim.cancel();
}

#[tokio::test]
async fn canceling_a_rollout_cancels_every_device_not_yet_dispatched() {
    // Docks that download slowly (300 kB at 50 kB/s): a gateway dispatched at once is still
    // in flight when the rollout is canceled, never already done.
    let g = gated_fleet(&["--rate", "50000"]).await;
    let app = &g.app;
    let mut slow = g.body.clone();
    slow["rate_per_minute"] = json!(0.001);
    slow["firmware"] = json!([{"model": "Dock", "product_version": "2.0.0"}]);
    let id = start_rollout(app, slow).await;
    // Canceled at once: every device not yet dispatched is canceled (one the scheduler has
    // dispatched already may stay in flight).
    let (status, c) = act(app, &id, "cancel").await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["status"], "canceled");
    let (_, c) = app.get_json(&format!("/api/v1/rollouts/{id}")).await;
    let in_flight = c["counts"]["in_flight"].as_u64().unwrap_or(0);
    let canceled = c["counts"]["canceled"].as_u64().unwrap_or(0);
    assert_eq!(
        in_flight + canceled + c["counts"]["skipped_up_to_date"].as_u64().unwrap_or(0),
        4,
        "{c}"
    );
    g.sim.cancel();
}

#[tokio::test]
async fn kill_9_mid_rollout_then_it_completes_upgrading_each_device_once() {
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let config = root.path().join("fwrepo.toml");
    std::fs::write(
        &config,
        "[models]\n\"3-1-0\" = \"Dock\"\n\"0-67-0\" = \"M30\"\n",
    )
    .unwrap();
    // Fixed ports: the docks' file_url and broker address must survive the restart.
    let http = format!("127.0.0.1:{}", free_port());
    let mqtt = format!("127.0.0.1:{}", free_port());
    let args = [
        "--listen",
        http.as_str(),
        "--mqtt-listen",
        mqtt.as_str(),
        "--config",
        config.to_str().unwrap(),
        "--ota-progress-timeout",
        "5",
    ];
    let mut server = ServerProcess::start(&data_dir, &args);
    let client = server.client();
    let upload = |name: &'static str, seed: u64| {
        let (client, base) = (client.clone(), server.base.clone());
        async move {
            let r: Value = client
                .post(format!("{base}/api/v1/firmware?file_name={name}"))
                .body(payload(300_000, seed))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            r["id"].as_str().unwrap().to_string()
        }
    };
    let dock_fw = upload("Dock_2.0.0.zip", 21).await;
    let ac_fw = upload("M30_2.0.0.zip", 22).await;
    let (prefix, sim) = fleet(&mqtt, 6, &[]).await;
    let base = server.base.clone();
    assert!(
        wait_until(Duration::from_secs(20), || async {
            let d = get_json_at(&base, "/api/v1/devices?limit=500").await;
            d["items"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|x| x["sn"].as_str().unwrap().starts_with(&prefix) && x["online"] == true)
                .count()
                == 12
        })
        .await
    );
    let target: Vec<String> = (1..=6).map(|i| gw(&prefix, i)).collect();
    let body = json!({"name": "restart", "firmware": [{"firmware_id": dock_fw}, {"firmware_id": ac_fw}],
        "target": {"gateway_sns": target}, "stages": [{"percent": 50}, {"percent": 100}],
        "rate_per_minute": 40, "max_in_flight": 2});
    let r: Value = client
        .post(format!("{base}/api/v1/rollouts"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let id = r["id"].as_str().unwrap().to_string();
    client
        .post(format!("{base}/api/v1/rollouts/{id}/start"))
        .send()
        .await
        .unwrap();
    // Crash once some gateways are dispatched and others are not.
    assert!(
        wait_until(Duration::from_secs(30), || async {
            let r = get_json_at(&base, &format!("/api/v1/rollouts/{id}")).await;
            r["counts"]["ok"].as_u64().unwrap_or(0) >= 2
        })
        .await
    );
    wait_for_catalog_flush(&base).await;
    server.kill9();
    let server = ServerProcess::start(&data_dir, &args);
    let base = server.base.clone();
    let mut last = Value::Null;
    for _ in 0..300 {
        last = get_json_at(&base, &format!("/api/v1/rollouts/{id}")).await;
        if last["status"] == "completed" || last["status"] == "paused" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(last["status"], "completed", "{last}");
    assert_eq!(last["counts"]["ok"], 12, "{last}");
    // Upgraded exactly once: one task per gateway ended ok (a task whose ota_create died with
    // the server's embedded broker could time out and be retried, never upgrade twice).
    for g in &target {
        let tasks = get_json_at(&base, &format!("/api/v1/ota?gateway_sn={g}")).await;
        let items = tasks["items"].as_array().unwrap();
        let ok = items.iter().filter(|t| t["status"] == "ok").count();
        assert_eq!(ok, 1, "{g} upgraded {ok} times: {tasks}");
        assert!(items.len() <= 2, "{g} dispatched {} times", items.len());
    }
    sim.cancel();
}

#[tokio::test]
async fn gateways_joining_a_model_target_are_added_when_asked() {
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let (first, sim1) = fleet(&app.mqtt_addr(), 2, &[]).await;
    wait_fleet_online(&app, &first, 2).await;
    let body = json!({"name": "grow", "firmware": firmware,
        "target": {"model": "Dock", "seen_within_s": 600}, "include_new_devices": true,
        "stages": [{"percent": 50}, {"percent": 100}], "rate_per_minute": 12});
    let id = start_rollout(&app, body).await;
    let (_, started) = app.get_json(&format!("/api/v1/rollouts/{id}")).await;
    assert_eq!(started["gateways"], 2, "{started}");
    // A dock that comes online while the rollout runs joins its last stage.
    let (late, sim2) = fleet(&app.mqtt_addr(), 1, &[]).await;
    let done = wait_status(&app, &id, &["completed", "paused"], 90).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["gateways"], 3, "{done}");
    assert_eq!(done["counts"]["ok"], 6, "{done}");
    let rows = devices_of(&app, &id).await;
    let joined = rows
        .iter()
        .find(|r| r["sn"] == gw(&late, 1).as_str())
        .unwrap();
    assert_eq!(joined["stage"], 1, "{joined}");
    sim1.cancel();
    sim2.cancel();
}

#[tokio::test]
async fn rollout_on_an_external_broker() {
    let Ok(url) = std::env::var("FWREPO_TEST_MQTT_URL") else {
        eprintln!("SKIP rollout on an external broker: FWREPO_TEST_MQTT_URL not set");
        return;
    };
    let u = url::Url::parse(&url).unwrap();
    let (host, port) = (u.host_str().unwrap().to_string(), u.port().unwrap_or(1883));
    let app = spawn_with(|s| {
        models(s);
        s.mqtt = fwrepo::mqtt::MqttSettings {
            target: fwrepo::mqtt::BrokerTarget::External {
                host: host.clone(),
                port,
                tls: None,
                user: None,
                password: None,
            },
            client_id: Some(format!(
                "fwrepo-test-{}",
                fwrepo::domain::ids::next().to_lowercase()
            )),
            replies: true,
            share_group: None,
            embedded: Default::default(),
        };
    })
    .await;
    let firmware = release(&app).await;
    let (prefix, sim) = fleet(&format!("{host}:{port}"), 4, &[]).await;
    wait_fleet_online(&app, &prefix, 4).await;
    let target: Vec<String> = (1..=4).map(|i| gw(&prefix, i)).collect();
    let body = json!({"name": "external", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 50}, {"percent": 100}], "rate_per_minute": null, "max_in_flight": 2});
    let id = start_rollout(&app, body).await;
    let done = wait_status(&app, &id, &["completed", "paused"], 90).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["counts"]["ok"], 8, "{done}");
    sim.cancel();
}

#[tokio::test]
async fn timed_out_tasks_are_retried_only_while_the_dock_is_idle_and_off_target() {
    // The docks never answer: each task times out (reply timeout 5 s). The docks keep
    // reporting idle osd and the old version, so the rollout retries, then gives up.
    let app = spawn_with(models).await;
    let firmware = release(&app).await;
    let (prefix, sim) = fleet(&app.mqtt_addr(), 2, &["--fail", "silent"]).await;
    wait_fleet_online(&app, &prefix, 2).await;
    let target: Vec<String> = (1..=2).map(|i| gw(&prefix, i)).collect();
    let body = json!({"name": "silent", "firmware": firmware, "target": {"gateway_sns": target},
        "stages": [{"percent": 100}], "rate_per_minute": null, "max_retries": 1,
        "retry_backoff_s": 1, "min_sample": 10});
    let id = start_rollout(&app, body).await;
    let done = wait_status(&app, &id, &["paused", "completed"], 60).await;
    assert_eq!(done["status"], "paused", "{done}");
    assert_eq!(done["counts"]["failed"], 4, "{done}");
    assert!(
        done["pause_reason"]
            .as_str()
            .unwrap()
            .contains("success_threshold")
    );
    for g in (1..=2).map(|i| gw(&prefix, i)) {
        let tasks = tasks_of(&app, &g).await;
        assert_eq!(tasks.len(), 2, "one retry after the timeout: {g}");
        assert!(tasks.iter().all(|t| t["status"] == "timeout"));
    }
    let rows = devices_of(&app, &id).await;
    assert!(
        rows.iter()
            .all(|r| r["attempts"] == 2 && r["last_error"].as_str().unwrap().contains("timed out")),
        "{rows:?}"
    );
    sim.cancel();
}
