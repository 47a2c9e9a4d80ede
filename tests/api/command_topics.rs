//! Commands arriving on a service's command topic are decided like HTTP ones, once each.

use std::time::Duration;

use chrono::Utc;
use command_services::messages::{CommandMessage, ServiceCommand};
use domain::{OrderId, Quantity};
use event_log::partition_for;
use event_schema::Envelope;

use crate::helpers::{TestApp, backends};

async fn stock_events(app: &TestApp, sku: &str) -> Vec<Envelope> {
    let log = app.log().await;
    let topic = event_log::topics::events(&app.settings.store.topic_prefix, "stock");
    let partition = partition_for(sku, app.settings.partitions);
    let end = log.end_offset(&topic, partition).await.expect("end");
    let mut reader = log.reader(&topic, &[(partition, 0)]).await.expect("reader");
    let mut events = Vec::new();
    let mut read = 0;
    while read < end {
        for record in reader
            .poll(100, Duration::from_millis(200))
            .await
            .expect("poll")
        {
            read = record.position.offset + 1;
            let envelope = Envelope::try_from(&record.record).expect("decode");
            if envelope.aggregate_id == sku {
                events.push(envelope);
            }
        }
    }
    events
}

async fn wait_for_events(app: &TestApp, sku: &str, count: usize) -> Vec<Envelope> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let events = stock_events(app, sku).await;
        if events.len() >= count {
            return events;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "only {} of {count} events for {sku}",
            events.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_sent_on_the_command_topic_is_decided_once_even_when_redelivered() {
    for backend in backends() {
        let app = TestApp::spawn(backend).await;
        app.receive("SKU-C", 5).await.expect(200);
        let log = app.log().await;
        let topic = event_log::topics::commands(&app.settings.store.topic_prefix, "inventory");
        let order_id = OrderId(uuid::Uuid::now_v7());
        let message = CommandMessage {
            command_id: uuid::Uuid::now_v7(),
            correlation_id: "saga-test".into(),
            causation_id: Some("order-placed-event".into()),
            actor: "saga".into(),
            aggregate_id: "SKU-C".into(),
            issued_at: Utc::now(),
            traceparent: None,
            attempt: None,
            command: ServiceCommand::ReserveStock {
                order_id,
                quantity: Quantity::new(3).expect("quantity"),
            },
        };
        let partition = partition_for("SKU-C", app.settings.partitions);
        log.append(&topic, partition, message.to_record())
            .await
            .expect("send command");
        let events = wait_for_events(&app, "SKU-C", 2).await;
        assert_eq!(events[1].event_type, "stock.reserved", "{backend:?}");
        assert_eq!(events[1].command_id, message.command_id);
        assert_eq!(events[1].correlation_id, "saga-test");
        assert_eq!(events[1].causation_id, "order-placed-event");

        // The same command again (a redelivery), then a rejection for another order.
        log.append(&topic, partition, message.to_record())
            .await
            .expect("resend");
        let mut too_much = message.clone();
        too_much.command_id = uuid::Uuid::now_v7();
        too_much.command = ServiceCommand::ReserveStock {
            order_id: OrderId(uuid::Uuid::now_v7()),
            quantity: Quantity::new(3).expect("quantity"),
        };
        log.append(&topic, partition, too_much.to_record())
            .await
            .expect("send");
        let events = wait_for_events(&app, "SKU-C", 3).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let events_after = stock_events(&app, "SKU-C").await;
        assert_eq!(
            events_after.len(),
            3,
            "{backend:?}: the redelivered command changed nothing"
        );
        assert_eq!(events[2].event_type, "stock.reservation_rejected");
        assert_eq!(events[2].data["available"], 2);
    }
}
