//! Starting the order, payment, inventory and customer services on a log and a store, and
//! wiring each one's command topic to its owner.

use std::sync::Arc;
use std::time::Duration;

use domain::customer::CustomerAggregate;
use domain::order::{OrderAggregate, OrderCommand};
use domain::payment::{PaymentAggregate, PaymentCommand, PaymentState};
use domain::stock::{StockAggregate, StockCommand};
use domain::{Aggregate, Decision, OrderId};
use event_log::{SharedLog, topics};
use event_schema::{CommandMeta, EventCodec};
use serde::Serialize;
use serde::de::DeserializeOwned;
use supervisor::Supervisor;
use tokio::sync::watch;

use crate::consumer;
use crate::messages::{CommandMessage, ServiceCommand};
use crate::owner::{CommandError, CommandRequest, Owner, OwnerConfig, OwnerStatus};
use crate::provider::{
    PaymentProvider, ProviderPolicy, authorise_with_retries, release_with_retries,
};
use crate::store::{CommandStore, StoreError};
use http_edge::headers::digest;
use personal_data::KeyStore;

/// Which services run in this process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceSet {
    pub order: bool,
    pub payment: bool,
    pub inventory: bool,
    pub customer: bool,
}

impl ServiceSet {
    pub const ALL: ServiceSet = ServiceSet {
        order: true,
        payment: true,
        inventory: true,
        customer: true,
    };
    pub const NONE: ServiceSet = ServiceSet {
        order: false,
        payment: false,
        inventory: false,
        customer: false,
    };
}

/// How an instance learns which partitions it owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Assignment {
    /// The service's instances form one consumer group on its command topic; each owns what
    /// the group assigns it (cooperative-sticky), so scaling is starting or stopping instances.
    #[default]
    Group,
    /// Instance `instance` of `instances` owns the partitions `p % instances == instance`.
    /// Every instance must be given the same count; fencing keeps two owners of a partition
    /// safe, but nothing takes over a partition whose instance is gone.
    Static,
}

/// The default idempotency window: a day, as payment APIs keep their idempotency keys.
pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// How the command side runs.
#[derive(Debug, Clone)]
pub struct CommandSettings {
    pub topic_prefix: String,
    /// Partitions of each events and commands topic (used when creating them).
    pub partitions: u32,
    pub services: ServiceSet,
    pub assignment: Assignment,
    /// With [`Assignment::Static`]: this instance's index among `instances`; it owns the
    /// partitions `p % instances == instance`.
    pub instance: u32,
    pub instances: u32,
    pub snapshot_every: u64,
    pub read_back_timeout: Duration,
    /// How long (in log time) a repeated `Idempotency-Key` or command id gets its original
    /// outcome back.
    pub idempotency_window: Duration,
    pub provider_policy: ProviderPolicy,
}

impl CommandSettings {
    pub fn new(topic_prefix: impl Into<String>) -> Self {
        CommandSettings {
            topic_prefix: topic_prefix.into(),
            partitions: 8,
            services: ServiceSet::ALL,
            assignment: Assignment::Group,
            instance: 0,
            instances: 1,
            snapshot_every: 5_000,
            read_back_timeout: Duration::from_secs(10),
            idempotency_window: DEFAULT_IDEMPOTENCY_WINDOW,
            provider_policy: ProviderPolicy::default(),
        }
    }
}

/// Why the command services could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Log(#[from] event_log::LogError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// An owner could not take up its partitions; the owner's error is the source.
    #[error("the {service} service's owner: {source}")]
    Owner {
        service: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The topics or the stored positions are not what the service can start on, in words
    /// that say what to do.
    #[error("{0}")]
    Refused(String),
}

/// The running services of this process; cheap to clone (the HTTP handlers' state).
#[derive(Debug, Clone, Default)]
pub struct CommandState {
    pub orders: Option<Owner<OrderAggregate>>,
    pub stock: Option<Owner<StockAggregate>>,
    pub payments: Option<Owner<PaymentAggregate>>,
    pub customers: Option<Owner<CustomerAggregate>>,
    /// The customers' data keys, which the customer service seals personal fields with.
    pub keys: Option<KeyStore>,
}

impl CommandState {
    /// Starts the services in `settings.services`: creates their topics when missing, loads
    /// snapshots, starts the owners and the command-topic consumers. The services become ready
    /// when caught up with the log (see [`CommandState::ready`]).
    pub async fn start(
        log: SharedLog,
        store: Arc<dyn CommandStore>,
        settings: &CommandSettings,
        provider: Arc<dyn PaymentProvider>,
        keys: KeyStore,
        shutdown: watch::Receiver<bool>,
        supervisor: &Supervisor,
    ) -> Result<Self, StartError> {
        let tasks = Tasks {
            shutdown: &shutdown,
            supervisor,
        };
        let mut state = CommandState::default();
        if settings.services.inventory {
            let owner =
                start_owner::<StockAggregate>(&log, &store, settings, "inventory", tasks).await?;
            let handler_owner = owner.clone();
            spawn_consumer(
                &log,
                &store,
                settings,
                "inventory",
                &owner,
                tasks,
                move |message| {
                    let owner = handler_owner.clone();
                    async move { inventory_command(&owner, message).await }
                },
            );
            state.stock = Some(owner);
        }
        if settings.services.order {
            let owner =
                start_owner::<OrderAggregate>(&log, &store, settings, "order", tasks).await?;
            let handler_owner = owner.clone();
            spawn_consumer(
                &log,
                &store,
                settings,
                "order",
                &owner,
                tasks,
                move |message| {
                    let owner = handler_owner.clone();
                    async move { order_command(&owner, message).await }
                },
            );
            state.orders = Some(owner);
        }
        if settings.services.payment {
            let owner =
                start_owner::<PaymentAggregate>(&log, &store, settings, "payment", tasks).await?;
            let handler_owner = owner.clone();
            let policy = settings.provider_policy.clone();
            spawn_consumer(
                &log,
                &store,
                settings,
                "payment",
                &owner,
                tasks,
                move |message| {
                    let owner = handler_owner.clone();
                    let provider = provider.clone();
                    let policy = policy.clone();
                    async move { payment_command(&owner, &*provider, &policy, message).await }
                },
            );
            state.payments = Some(owner);
        }
        if settings.services.customer {
            let owner =
                start_owner::<CustomerAggregate>(&log, &store, settings, "customer", tasks).await?;
            // Customers' commands come over HTTP only; the consumer of their command topic is
            // what gives the instances of the service their partitions (group assignment).
            spawn_consumer(
                &log,
                &store,
                settings,
                "customer",
                &owner,
                tasks,
                move |message| async move { misrouted("customer", &message) },
            );
            state.customers = Some(owner);
            state.keys = Some(keys);
        }
        Ok(state)
    }

    /// Every service of this process has caught up with the log.
    pub fn ready(&self) -> bool {
        self.orders.as_ref().is_none_or(Owner::is_ready)
            && self.stock.as_ref().is_none_or(Owner::is_ready)
            && self.payments.as_ref().is_none_or(Owner::is_ready)
            && self.customers.as_ref().is_none_or(Owner::is_ready)
    }

    /// After shutdown: waits until every owner has written its last snapshots.
    pub async fn snapshots_written(&self) {
        if let Some(owner) = &self.orders {
            owner.snapshots_written().await;
        }
        if let Some(owner) = &self.stock {
            owner.snapshots_written().await;
        }
        if let Some(owner) = &self.payments {
            owner.snapshots_written().await;
        }
        if let Some(owner) = &self.customers {
            owner.snapshots_written().await;
        }
    }

    pub fn statuses(&self) -> Vec<OwnerStatus> {
        let mut statuses = Vec::new();
        if let Some(owner) = &self.orders {
            statuses.push(owner.status());
        }
        if let Some(owner) = &self.stock {
            statuses.push(owner.status());
        }
        if let Some(owner) = &self.payments {
            statuses.push(owner.status());
        }
        if let Some(owner) = &self.customers {
            statuses.push(owner.status());
        }
        statuses
    }

    /// Waits until every service is ready, at most `limit`.
    pub async fn wait_ready(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !self.ready() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        true
    }
}

async fn start_owner<A>(
    log: &SharedLog,
    store: &Arc<dyn CommandStore>,
    settings: &CommandSettings,
    service: &str,
    tasks: Tasks<'_>,
) -> Result<Owner<A>, StartError>
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
    A::Command: Send + Sync,
    A::Event: Send,
    A::Error: Send + Sync + 'static,
{
    let events = topics::events(&settings.topic_prefix, A::TYPE);
    let commands = topics::commands(&settings.topic_prefix, service);
    let event_partitions = log.ensure_topic(&events, settings.partitions).await?;
    let command_partitions = log.ensure_topic(&commands, event_partitions).await?;
    if command_partitions != event_partitions {
        return Err(StartError::Refused(format!(
            "{commands} has {command_partitions} partitions but {events} has {event_partitions}; \
             they must match so one instance owns an aggregate's events and commands"
        )));
    }
    if settings.instances == 0 || settings.instance >= settings.instances {
        return Err(StartError::Refused(format!(
            "instance {} of {} is not a valid instance",
            settings.instance, settings.instances
        )));
    }
    let owned: Vec<u32> = match settings.assignment {
        Assignment::Static => (0..event_partitions)
            .filter(|partition| partition % settings.instances == settings.instance)
            .collect(),
        // The group assigns them as the instance joins.
        Assignment::Group => Vec::new(),
    };
    check_command_positions(log, store, service, &commands, &owned).await?;
    let config = OwnerConfig {
        topic: events,
        partitions: event_partitions,
        owned,
        assigned_by_group: settings.assignment == Assignment::Group,
        holder: holder(),
        snapshot_every: settings.snapshot_every,
        read_back_timeout: settings.read_back_timeout,
        idempotency_window: settings.idempotency_window,
    };
    Owner::<A>::start(
        log.clone(),
        store.clone(),
        config,
        tasks.shutdown.clone(),
        tasks.supervisor,
    )
    .await
    .map_err(|error| StartError::Owner {
        service: service.to_owned(),
        source: Box::new(error),
    })
}

/// The consumer of a service's command topic, as its positions are stored.
pub fn command_consumer(service: &str) -> String {
    format!("{service}-commands")
}

/// Refuses to start on a command-topic position beyond the topic's end (the topic lost its
/// tail, or was recreated under the same name): reading on from there would skip every
/// command sent until the topic grows past it.
async fn check_command_positions(
    log: &SharedLog,
    store: &Arc<dyn CommandStore>,
    service: &str,
    topic: &str,
    partitions: &[u32],
) -> Result<(), StartError> {
    let consumer = command_consumer(service);
    for &partition in partitions {
        let stored = store.load_position(&consumer, topic, partition).await?;
        let end = log.end_offset(topic, partition).await?;
        if let Some(stored) = stored
            && stored > end
        {
            return Err(StartError::Refused(format!(
                "the {service} service's position in {topic} partition {partition} is offset {stored}, \
                 but the topic ends at {end}: the topic lost records or was recreated. Reading on \
                 from there would skip the commands sent until it grows past {stored}; after \
                 checking the topic, run `platform recover` to see every stored position and \
                 snapshot ahead of the log, and `platform recover --apply` to reset them"
            )));
        }
    }
    Ok(())
}

/// This process, as the store's epoch table names an owner: host name and process id.
fn holder() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|host| host.trim().to_owned())
        .filter(|host| !host.is_empty())
        .unwrap_or_else(|| "unknown-host".to_owned());
    format!("{host}:{}", std::process::id())
}

/// How a service's long-running tasks learn of the stop, and who watches them.
#[derive(Clone, Copy)]
struct Tasks<'a> {
    shutdown: &'a watch::Receiver<bool>,
    supervisor: &'a Supervisor,
}

fn spawn_consumer<A, F, Fut>(
    log: &SharedLog,
    store: &Arc<dyn CommandStore>,
    settings: &CommandSettings,
    service: &str,
    owner: &Owner<A>,
    tasks: Tasks<'_>,
    handle: F,
) where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
    A::Command: Send + Sync,
    A::Event: Send,
    A::Error: Send + std::fmt::Display,
    F: Fn(CommandMessage) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let log = log.clone();
    let store = store.clone();
    let topic = topics::commands(&settings.topic_prefix, service);
    let consumer_name = command_consumer(service);
    let owner = owner.clone();
    let Tasks {
        shutdown,
        supervisor,
    } = tasks;
    let mut shutdown = shutdown.clone();
    if settings.assignment == Assignment::Group {
        let group = format!("{}.{service}.owners", settings.topic_prefix);
        supervisor.spawn(
            format!("{service} command consumer"),
            consumer::consume_group(
                log,
                store,
                consumer_name,
                group,
                topic,
                Arc::new(owner),
                handle,
                shutdown,
            ),
        );
        return;
    }
    supervisor.spawn(format!("{service} command consumer"), async move {
        // Commands are decided against caught-up state only.
        while !owner.is_ready() {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        let partitions = owner
            .status()
            .partitions
            .iter()
            .map(|status| status.partition)
            .collect();
        consumer::consume(
            log,
            store,
            consumer_name,
            topic,
            partitions,
            handle,
            shutdown,
        )
        .await;
    });
}

/// Runs a command from a command topic, retrying while the log is unavailable (a consumed
/// command must not be lost), and logging what the domain refused.
async fn execute<A>(owner: &Owner<A>, message: &CommandMessage, command: A::Command)
where
    A: EventCodec + Send + Sync + 'static,
    A::State: Serialize + DeserializeOwned + Send + Sync,
    A::Command: Send + Sync + Clone,
    A::Event: Send,
    A::Error: Send + std::fmt::Display,
{
    let mut backoff = Duration::from_millis(50);
    loop {
        let request = CommandRequest {
            aggregate_id: message.aggregate_id.clone(),
            command: command.clone(),
            meta: topic_command_meta(message),
            expected_version: None,
        };
        match owner.execute(request).await {
            Ok(outcome) => {
                tracing::debug!(command = message.command.name(), aggregate_id = %message.aggregate_id, ?outcome, "command decided");
                return;
            }
            Err(CommandError::Domain(error)) => {
                tracing::info!(command = message.command.name(), aggregate_id = %message.aggregate_id, %error, "command refused");
                return;
            }
            // A newer owner's records fenced this one off the partition (or it stopped writing
            // there): the command waits here, and this consumer's position with it, while the
            // partition's owner decides it.
            Err(
                error @ (CommandError::Unavailable(_)
                | CommandError::Log(_)
                | CommandError::NotReady
                | CommandError::Contended { .. }
                | CommandError::Fenced { .. }
                | CommandError::SteppedDown { .. }),
            ) => {
                tracing::warn!(command = message.command.name(), %error, "cannot decide the command yet; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(error) => {
                tracing::warn!(command = message.command.name(), aggregate_id = %message.aggregate_id, %error, "command not decided");
                return;
            }
        }
    }
}

/// A command from a topic may be delivered again (at least once, and senders resend): its
/// fingerprint, of what it asks and not of when it was sent, gets its outcome remembered and
/// tells a redelivery from another command sent under the same id.
fn topic_command_meta(message: &CommandMessage) -> CommandMeta {
    let mut meta = message.meta();
    let asked = serde_json::to_string(&(&message.aggregate_id, &message.command))
        .unwrap_or_else(|_| message.command.name().to_owned());
    meta.request_hash = Some(digest(&asked));
    meta
}

fn misrouted(service: &str, message: &CommandMessage) {
    tracing::error!(
        service,
        command = message.command.name(),
        command_id = %message.command_id,
        "command sent to the wrong service's topic; skipped"
    );
}

async fn inventory_command(owner: &Owner<StockAggregate>, message: CommandMessage) {
    let command = match &message.command {
        ServiceCommand::ReserveStock { order_id, quantity } => StockCommand::Reserve {
            order_id: *order_id,
            quantity: *quantity,
        },
        ServiceCommand::ReleaseStock { order_id } => StockCommand::Release {
            order_id: *order_id,
        },
        ServiceCommand::CommitStock { order_id } => StockCommand::Commit {
            order_id: *order_id,
        },
        _ => return misrouted("inventory", &message),
    };
    execute(owner, &message, command).await;
}

async fn order_command(owner: &Owner<OrderAggregate>, message: CommandMessage) {
    let command = match &message.command {
        ServiceCommand::ConfirmOrder => OrderCommand::Confirm,
        ServiceCommand::RejectOrder { reason } => OrderCommand::Reject {
            reason: reason.clone(),
        },
        _ => return misrouted("order", &message),
    };
    execute(owner, &message, command).await;
}

async fn payment_command(
    owner: &Owner<PaymentAggregate>,
    provider: &dyn PaymentProvider,
    policy: &ProviderPolicy,
    message: CommandMessage,
) {
    let Ok(order_id) = OrderId::parse(&message.aggregate_id) else {
        tracing::error!(aggregate_id = %message.aggregate_id, "payment command for a non-order id; skipped");
        return;
    };
    let command = match &message.command {
        ServiceCommand::AuthorisePayment { amount, token } => {
            // The provider is asked once per payment: a repeated request changes nothing.
            if !matches!(
                owner.state(&message.aggregate_id).0,
                PaymentState::NotStarted
            ) {
                tracing::debug!(%order_id, "payment already decided; authorisation not asked again");
                return;
            }
            let Some(answer) =
                authorise_with_retries(provider, policy, order_id, *amount, token).await
            else {
                tracing::info!(%order_id, "payment provider gave no answer; the saga's deadline decides");
                return;
            };
            PaymentCommand::Authorise {
                order_id,
                amount: *amount,
                token: token.clone(),
                answer,
            }
        }
        ServiceCommand::CapturePayment { amount } => PaymentCommand::Capture { amount: *amount },
        ServiceCommand::RefundPayment { amount, reason } => PaymentCommand::Refund {
            amount: *amount,
            reason: reason.clone(),
        },
        ServiceCommand::VoidPayment { reason } => PaymentCommand::Void {
            reason: reason.clone(),
        },
        _ => return misrouted("payment", &message),
    };
    if matches!(
        command,
        PaymentCommand::Refund { .. } | PaymentCommand::Void { .. }
    ) && !provider_released(owner, provider, policy, &message, order_id, &command).await
    {
        tracing::info!(%order_id, command = message.command.name(), "the payment provider did not void or refund; nothing recorded, the saga resends");
        return;
    }
    execute(owner, &message, command).await;
}

/// Asks the provider to void or refund before the payment records it, when the payment would
/// record it (a repeat or a refusal asks nothing). True when it may be recorded.
async fn provider_released(
    owner: &Owner<PaymentAggregate>,
    provider: &dyn PaymentProvider,
    policy: &ProviderPolicy,
    message: &CommandMessage,
    order_id: OrderId,
    command: &PaymentCommand,
) -> bool {
    let (state, _) = owner.state(&message.aggregate_id);
    if !matches!(
        PaymentAggregate::decide(&state, command),
        Ok(Decision::Append(_))
    ) {
        // Unchanged or refused: the owner answers that without the provider.
        return true;
    }
    // Voided before any authorisation: nothing is held at the provider.
    let Some(authorisation_id) = state
        .payment()
        .and_then(|payment| payment.authorisation_id.clone())
    else {
        return true;
    };
    let attempt = message.attempt.unwrap_or(1);
    match command {
        PaymentCommand::Refund { amount, .. } => {
            release_with_retries(policy, order_id, || {
                provider.refund(order_id, &authorisation_id, *amount, attempt)
            })
            .await
        }
        _ => {
            release_with_retries(policy, order_id, || {
                provider.void(order_id, &authorisation_id, attempt)
            })
            .await
        }
    }
}
