//! `virtufin smoke`: the seed's wiring check, step by step.

use std::{collections::HashMap, process::ExitCode, time::Duration};

use virtufin_api_client::pb;

const TOPIC: &str = "websocketmanager.connectionstatus";
const STEP_TIMEOUT: Duration = Duration::from_secs(10);

struct Report {
    failed: bool,
}

impl Report {
    fn step(&mut self, name: &str, result: Result<String, String>) -> bool {
        match result {
            Ok(detail) => {
                println!("PASS  {name:<28} {detail}");
                true
            }
            Err(why) => {
                println!("FAIL  {name:<28} {why}");
                self.failed = true;
                false
            }
        }
    }
}

fn status(e: tonic::Status) -> String {
    format!("{:?}: {}", e.code(), e.message())
}

pub async fn run(addr: &str) -> anyhow::Result<ExitCode> {
    let mut r = Report { failed: false };
    println!("smoke check against {addr}");
    let api = crate::api_client(addr)?;

    let health = tokio::time::timeout(STEP_TIMEOUT, api.handshake()).await;
    let ok = r.step(
        "Health/HealthCheck",
        match health {
            Ok(Ok(h)) => Ok(format!("{} ({} backend)", h.status, h.backend)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err(format!("no answer within {STEP_TIMEOUT:?}")),
        },
    );
    if !ok {
        return Ok(ExitCode::from(1));
    }

    // The seed's subscriber and group; a fresh event id, so that this run
    // recognises its own event among others on the topic.
    let sub_req = pb::SubscribeRequest {
        topic: TOPIC.into(),
        subscriber: "test".into(),
        group: "smoke".into(),
    };
    let stream = tokio::time::timeout(STEP_TIMEOUT, api.pubsub().subscribe(sub_req.clone())).await;
    let mut stream = match stream {
        Ok(Ok(s)) => {
            r.step(
                "Pubsub/Subscribe",
                Ok(format!("streaming {TOPIC} as test@smoke")),
            );
            s.into_inner()
        }
        Ok(Err(e)) => {
            r.step("Pubsub/Subscribe", Err(status(e)));
            return Ok(ExitCode::from(1));
        }
        Err(_) => {
            r.step("Pubsub/Subscribe", Err("no answer".into()));
            return Ok(ExitCode::from(1));
        }
    };

    let id = format!("smoke-{}", uuid::Uuid::new_v4());
    let mut md = HashMap::new();
    md.insert(
        "ce-type".into(),
        "com.virtufin.websocketmanager.connection.connected".into(),
    );
    md.insert("ce-source".into(), "urn:test".into());
    md.insert("ce-id".into(), id.clone());
    let data = r#"{"connection_id":"smoke","url":"ws://localhost"}"#;
    let published = api.publish(TOPIC, data, md).await;
    r.step(
        "Pubsub/PublishEvent",
        published
            .map(|i| format!("id {i}"))
            .map_err(|e| e.to_string()),
    );

    let received = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match stream.message().await {
                Ok(Some(ev)) if ev.id == id => return Ok(ev),
                Ok(Some(_)) => continue, // someone else's event on this topic
                Ok(None) => return Err("the stream ended before the event arrived".to_owned()),
                Err(e) => return Err(status(e)),
            }
        }
    })
    .await;
    r.step(
        "event delivered",
        match received {
            Ok(Ok(ev)) => Ok(format!("{} from {}", ev.r#type, ev.source)),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("not within {STEP_TIMEOUT:?}")),
        },
    );

    let unsub = api
        .pubsub()
        .unsubscribe(pb::UnsubscribeRequest {
            topic: sub_req.topic,
            subscriber: sub_req.subscriber,
            group: sub_req.group,
        })
        .await;
    r.step(
        "Pubsub/Unsubscribe",
        unsub.map(|u| u.into_inner().message).map_err(status),
    );
    let ended = tokio::time::timeout(STEP_TIMEOUT, async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(e) => return Err(status(e)),
            }
        }
    })
    .await;
    r.step(
        "subscription ended",
        match ended {
            Ok(Ok(())) => Ok("the stream closed".into()),
            Ok(Err(e)) => Err(e),
            Err(_) => Err("the stream stayed open after Unsubscribe".into()),
        },
    );
    if r.failed {
        println!("smoke check FAILED");
        Ok(ExitCode::from(1))
    } else {
        println!("smoke check passed");
        Ok(ExitCode::SUCCESS)
    }
}
