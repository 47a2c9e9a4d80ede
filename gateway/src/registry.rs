//! The registry: each upstream's instances (from `--gateway-<upstream>`, base URLs and/or
//! `dns://name:port` re-resolved at every health round), their health and the partitions each
//! owns (from their `/health/ready`), and the policies requests follow.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use axum::http::StatusCode;
use http_edge::ApiError;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde::Deserialize;
use tokio::sync::watch;

use crate::breaker::BreakerState;
use crate::routing::Upstream;
use crate::{Config, Error};

/// One instance of an upstream.
#[derive(Debug)]
pub struct Instance {
    pub base: String,
    pub(crate) healthy: AtomicBool,
    /// Topic → partitions this instance owns (from its `/health/ready`).
    pub(crate) owned: RwLock<HashMap<String, Vec<u32>>>,
    pub(crate) breaker: Mutex<BreakerState>,
}

impl Instance {
    pub(crate) fn new(base: String) -> Self {
        Instance {
            base,
            // Healthy until a health check says otherwise, so a fresh gateway serves at once.
            healthy: AtomicBool::new(true),
            owned: RwLock::new(HashMap::new()),
            breaker: Mutex::new(BreakerState::Closed { failures: 0 }),
        }
    }

    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Forgets that this instance owns `partition` of `topic` (it said it does not), until its
    /// next health check says otherwise.
    pub(crate) fn disown(&self, topic: &str, partition: u32) {
        if let Ok(mut owned) = self.owned.write()
            && let Some(partitions) = owned.get_mut(topic)
        {
            partitions.retain(|owned| *owned != partition);
        }
    }

    pub(crate) fn owns(&self, topic: &str, partition: u32) -> bool {
        self.owned
            .read()
            .map(|owned| owned.get(topic).is_some_and(|p| p.contains(&partition)))
            .unwrap_or(false)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum Source {
    Url(String),
    Dns { host: String, port: u16 },
}

pub(crate) fn parse_source(raw: &str) -> Result<Source, Error> {
    let raw = raw.trim().trim_end_matches('/');
    if let Some(rest) = raw.strip_prefix("dns://") {
        let (host, port) = rest
            .rsplit_once(':')
            .ok_or_else(|| Error::Upstream(format!("{raw}: dns:// needs name:port")))?;
        let port = port
            .parse()
            .map_err(|_| Error::Upstream(format!("{raw}: not a port")))?;
        return Ok(Source::Dns {
            host: host.to_owned(),
            port,
        });
    }
    if raw.starts_with("http://") || raw.starts_with("https://") {
        return Ok(Source::Url(raw.to_owned()));
    }
    Err(Error::Upstream(format!(
        "{raw}: an upstream is http://host:port or dns://name:port"
    )))
}

/// The instances of one upstream.
#[derive(Debug)]
pub struct Pool {
    pub upstream: Upstream,
    pub(crate) sources: Vec<Source>,
    pub(crate) instances: RwLock<Vec<Arc<Instance>>>,
    pub(crate) next: AtomicUsize,
}

impl Pool {
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.instances
            .read()
            .map(|instances| instances.clone())
            .unwrap_or_default()
    }

    pub(crate) async fn resolve(&self) {
        let mut bases = Vec::new();
        for source in &self.sources {
            match source {
                Source::Url(url) => bases.push(url.clone()),
                Source::Dns { host, port } => {
                    match tokio::net::lookup_host((host.as_str(), *port)).await {
                        Ok(addresses) => {
                            let mut found: Vec<String> =
                                addresses.map(|a| format!("http://{a}")).collect();
                            found.sort();
                            found.dedup();
                            bases.extend(found);
                        }
                        Err(error) => {
                            tracing::warn!(upstream = self.upstream.name(), host, %error, "cannot resolve upstream");
                        }
                    }
                }
            }
        }
        let mut instances = self.instances.write().unwrap_or_else(|e| e.into_inner());
        // Keep the instances (and their breakers) that are still there.
        let mut kept: Vec<Arc<Instance>> = Vec::new();
        for base in bases {
            if kept.iter().any(|instance| instance.base == base) {
                continue;
            }
            match instances.iter().find(|instance| instance.base == base) {
                Some(instance) => kept.push(instance.clone()),
                None => kept.push(Arc::new(Instance::new(base))),
            }
        }
        *instances = kept;
    }

    /// The instances to try, best first: the owner of `partition` of `topic` when one is
    /// known, else healthy instances round-robin. Instances whose breaker refuses are left
    /// out; `Err` says why nothing is left.
    pub(crate) fn candidates(
        &self,
        owner_of: Option<(&str, u32)>,
    ) -> Result<Vec<Arc<Instance>>, ApiError> {
        let instances = self.instances();
        if instances.is_empty() {
            return Err(ApiError::Unavailable(format!(
                "no instance of upstream {} is configured or resolvable",
                self.upstream.name()
            )));
        }
        let owners: Vec<Arc<Instance>> = match owner_of {
            Some((topic, partition)) => instances
                .iter()
                .filter(|instance| instance.owns(topic, partition))
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        let mut ordered = if owners.is_empty() {
            let healthy: Vec<Arc<Instance>> = instances
                .iter()
                .filter(|instance| instance.healthy())
                .cloned()
                .collect();
            // With no healthy instance at all, try them all rather than refuse: readiness
            // also fails on a lagging projection, whose instance still answers (or says why
            // not); the breakers keep dead ones out.
            let healthy = if healthy.is_empty() {
                instances.clone()
            } else {
                healthy
            };
            let start = self.next.fetch_add(1, Ordering::Relaxed) % healthy.len();
            let mut rotated = healthy[start..].to_vec();
            rotated.extend_from_slice(&healthy[..start]);
            rotated
        } else {
            owners
        };
        ordered.retain(|instance| instance.available());
        if ordered.is_empty() {
            return Err(ApiError::CircuitOpen(format!(
                "the circuit breaker of every instance of upstream {} is open: retry later",
                self.upstream.name()
            )));
        }
        Ok(ordered)
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReadyBody {
    #[serde(default)]
    pub(crate) services: Vec<ReadyService>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReadyService {
    pub(crate) topic: String,
    #[serde(default)]
    pub(crate) partitions: Vec<ReadyPartition>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct ReadyPartition {
    pub(crate) partition: u32,
    #[serde(default)]
    pub(crate) stepped_down: bool,
    #[serde(default)]
    pub(crate) fenced: bool,
    #[serde(default)]
    pub(crate) loading: bool,
}

/// Timeouts, retries and breaker settings.
#[derive(Debug, Clone)]
pub struct Policy {
    pub command_timeout: Duration,
    pub read_timeout: Duration,
    pub retries: u32,
    pub health_interval: Duration,
    pub breaker_failures: u32,
    pub breaker_open: Duration,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) retries: Counter,
    pub(crate) breaker_rejections: Counter,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) upstream: &'static str,
    pub(crate) status: u16,
}

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) pools: HashMap<Upstream, Pool>,
    pub(crate) policy: Policy,
    pub(crate) partitions: u32,
    pub(crate) topic_prefix: String,
    pub(crate) client: reqwest::Client,
    pub(crate) counters: Counters,
}

/// The gateway's shared state.
#[derive(Debug, Clone)]
pub struct Registry {
    pub(crate) inner: Arc<Inner>,
}

impl Registry {
    pub fn new(config: &Config) -> Result<Self, Error> {
        let gateway = &config.gateway;
        let mut pools = HashMap::new();
        for (upstream, raw) in [
            (Upstream::Order, &gateway.gateway_order),
            (Upstream::Inventory, &gateway.gateway_inventory),
            (Upstream::Customer, &gateway.gateway_customer),
            (Upstream::Query, &gateway.gateway_query),
            (Upstream::Saga, &gateway.gateway_saga),
        ] {
            let sources = raw
                .iter()
                .filter(|raw| !raw.trim().is_empty())
                .map(|raw| parse_source(raw))
                .collect::<Result<Vec<_>, _>>()?;
            if sources.is_empty() {
                continue;
            }
            pools.insert(
                upstream,
                Pool {
                    upstream,
                    sources,
                    instances: RwLock::new(Vec::new()),
                    next: AtomicUsize::new(0),
                },
            );
        }
        if pools.is_empty() {
            return Err(Error::Upstream(
                "the gateway needs at least one upstream (--gateway-order, --gateway-inventory, --gateway-customer, --gateway-query, --gateway-saga)"
                    .to_owned(),
            ));
        }
        let policy = Policy {
            command_timeout: Duration::from_millis(gateway.gateway_command_timeout_ms),
            read_timeout: Duration::from_millis(gateway.gateway_read_timeout_ms),
            retries: gateway.gateway_retries,
            health_interval: Duration::from_millis(gateway.gateway_health_interval_ms.max(10)),
            breaker_failures: gateway.gateway_breaker_failures.max(1),
            breaker_open: Duration::from_millis(gateway.gateway_breaker_open_ms),
        };
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            // Below the parts' header timeout (which closes a connection idle that long), so
            // the gateway drops an idle connection before a part does, and never sends a
            // request on one the part is closing.
            .pool_idle_timeout(
                Duration::from_millis(config.http.http_header_timeout_ms / 2)
                    .max(Duration::from_millis(100)),
            )
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(Error::Client)?;
        Ok(Registry {
            inner: Arc::new(Inner {
                pools,
                policy,
                partitions: config.partitions,
                topic_prefix: config.topic_prefix.clone(),
                client,
                counters: Counters::default(),
            }),
        })
    }

    pub fn pool(&self, upstream: Upstream) -> Option<&Pool> {
        self.inner.pools.get(&upstream)
    }

    /// One health round: resolve every pool, poll every instance's `/health/ready`.
    pub async fn check_health(&self) {
        let mut checks = tokio::task::JoinSet::new();
        for pool in self.inner.pools.values() {
            pool.resolve().await;
            for instance in pool.instances() {
                let client = self.inner.client.clone();
                let timeout = self
                    .inner
                    .policy
                    .health_interval
                    .clamp(Duration::from_millis(200), Duration::from_secs(2));
                checks.spawn(async move {
                    let url = format!("{}/health/ready", instance.base);
                    let answer = client.get(&url).timeout(timeout).send().await;
                    let (healthy, body) = match answer {
                        Ok(response) => {
                            let healthy = response.status() == StatusCode::OK;
                            (healthy, response.json::<ReadyBody>().await.ok())
                        }
                        Err(_) => (false, None),
                    };
                    if instance.healthy.swap(healthy, Ordering::Relaxed) != healthy {
                        tracing::info!(instance = %instance.base, healthy, "upstream health changed");
                    }
                    let owned = match body {
                        Some(body) => body
                            .services
                            .into_iter()
                            .map(|service| {
                                let partitions = service
                                    .partitions
                                    .into_iter()
                                    .filter(|p| !p.stepped_down && !p.fenced && !p.loading)
                                    .map(|p| p.partition)
                                    .collect();
                                (service.topic, partitions)
                            })
                            .collect(),
                        // An instance that does not answer owns nothing we can use.
                        None => HashMap::new(),
                    };
                    if let Ok(mut slot) = instance.owned.write() {
                        *slot = owned;
                    }
                });
            }
        }
        while checks.join_next().await.is_some() {}
    }

    pub(crate) async fn run_health_checks(self, mut shutdown: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tokio::time::sleep(self.inner.policy.health_interval) => {}
            }
            self.check_health().await;
        }
    }

    pub(crate) fn count(&self, upstream: Upstream, status: StatusCode) {
        self.inner
            .counters
            .requests
            .get_or_create(&RequestLabels {
                upstream: upstream.name(),
                status: status.as_u16(),
            })
            .inc();
    }
}
