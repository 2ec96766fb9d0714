//! Connecting to NATS (refusing servers older than 2.10) and provisioning a service's stream.

use std::time::Duration;

use async_nats::jetstream::stream::{Config as StreamConfig, DiscardPolicy, StorageType};
use async_nats::jetstream::Context;
use backon::{ExponentialBuilder, Retryable};

use crate::config::{redact_url, Secret};

/// The oldest nats-server this toolkit runs against: 2.9 silently ignores `filter_subjects`.
pub const MIN_SERVER_VERSION: (u64, u64) = (2, 10);

/// Errors connecting to NATS or provisioning streams.
#[derive(Debug, thiserror::Error)]
pub enum NatsError {
    /// Could not connect within the allowed time.
    #[error("cannot connect to NATS at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// The last error.
        reason: String,
    },
    /// The server is too old.
    #[error("nats-server {found} is too old: {}.{} or newer is required (2.9 ignores filter_subjects and has no sync_interval)", MIN_SERVER_VERSION.0, MIN_SERVER_VERSION.1)]
    ServerTooOld {
        /// The version the server reported.
        found: String,
    },
    /// Creating or updating a stream failed.
    #[error("cannot provision stream {stream}: {reason}")]
    Stream {
        /// The stream.
        stream: String,
        /// Why.
        reason: String,
    },
}

/// How to reach NATS.
#[derive(Clone)]
#[cfg_attr(feature = "service", derive(clap::Args))]
pub struct NatsSettings {
    /// NATS server URL(s), comma-separated.
    #[cfg_attr(
        feature = "service",
        arg(
            long = "nats-url",
            env = "NATS_URL",
            default_value = "nats://127.0.0.1:4222"
        )
    )]
    pub url: String,
    /// NATS user (with NATS_PASSWORD).
    #[cfg_attr(feature = "service", arg(long = "nats-user", env = "NATS_USER"))]
    pub user: Option<String>,
    /// NATS password.
    #[cfg_attr(
        feature = "service",
        arg(long = "nats-password", env = "NATS_PASSWORD")
    )]
    pub password: Option<Secret>,
    /// Client name shown in server monitoring.
    #[cfg_attr(feature = "service", arg(skip))]
    pub name: String,
    /// How long to keep retrying the first connection.
    #[cfg_attr(feature = "service", arg(skip = Duration::from_secs(120)))]
    pub connect_for: Duration,
}

impl std::fmt::Debug for NatsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSettings")
            .field("url", &redact_url(&self.url))
            .field("user", &self.user)
            .field("password", &self.password)
            .field("name", &self.name)
            .field("connect_for", &self.connect_for)
            .finish()
    }
}

/// The servers of a `NATS_URL`: one URL or a comma-separated list of a cluster's nodes (blanks
/// around commas ignored). Refused up front, so a typo is not retried for `connect_for`.
pub fn server_addrs(urls: &str) -> Result<Vec<async_nats::ServerAddr>, NatsError> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(|u| {
            u.parse::<async_nats::ServerAddr>()
                .map_err(|e| NatsError::Connect {
                    url: redact_url(u),
                    reason: format!("not a NATS URL: {e}"),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if addrs.is_empty() {
        return Err(NatsError::Connect {
            url: urls.to_owned(),
            reason: "no server URL given".to_owned(),
        });
    }
    Ok(addrs)
}

/// Connect with backoff (the server may still be starting) and check its version. Given several
/// servers, the client tries them in random order, first and on every reconnect, and learns the
/// rest of a cluster from the one it reaches. Once connected it reconnects forever on its own.
pub async fn connect(settings: &NatsSettings) -> Result<async_nats::Client, NatsError> {
    let addrs = server_addrs(&settings.url)?;
    let attempt = || async {
        let mut options = async_nats::ConnectOptions::new()
            .name(&settings.name)
            .connection_timeout(Duration::from_secs(3))
            .max_reconnects(None);
        if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
            options = options.user_and_password(user.clone(), password.expose().to_owned());
        }
        options.connect(addrs.as_slice()).await
    };
    let client = attempt
        .retry(
            ExponentialBuilder::default()
                .with_jitter()
                .with_max_delay(Duration::from_secs(2))
                .with_total_delay(Some(settings.connect_for))
                .without_max_times(),
        )
        .notify(|e, d| tracing::warn!(error = %e, retry_in = ?d, "NATS not reachable yet"))
        .await
        .map_err(|e| NatsError::Connect {
            url: redact_url(&settings.url),
            reason: e.to_string(),
        })?;
    check_server_version(&client.server_info().version)?;
    Ok(client)
}

/// Refuse servers older than [`MIN_SERVER_VERSION`].
pub fn check_server_version(version: &str) -> Result<(), NatsError> {
    if !server_version_at_least(version, MIN_SERVER_VERSION) {
        return Err(NatsError::ServerTooOld {
            found: version.to_owned(),
        });
    }
    Ok(())
}

/// Whether a reported version (`2.11.3`, `v2.15.1`, `3.0.0-beta`) is at least `(major, minor)`;
/// anything unparsable is not.
pub fn server_version_at_least(version: &str, min: (u64, u64)) -> bool {
    let mut parts = version
        .trim()
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= min
}

/// A stream a service owns: what it announces.
#[derive(Debug, Clone)]
pub struct StreamSpec {
    /// Stream name, e.g. `ORDERS`.
    pub name: String,
    /// Subjects it captures.
    pub subjects: Vec<String>,
    /// How long events are kept.
    pub max_age: Duration,
    /// Window in which a re-published `Nats-Msg-Id` is dropped.
    pub duplicate_window: Duration,
    /// Largest message accepted.
    pub max_msg_size: i32,
    /// Bytes the stream may hold. When full, new messages are refused (discard `new`), never old
    /// ones dropped: an event not yet consumed must not vanish. Publishers wait until `max_age`
    /// (or an operator) frees space.
    pub max_bytes: i64,
    /// Copies of the stream in a cluster (`STREAM_REPLICAS`): 1 on a single server, 3 on a
    /// three-node cluster so an acknowledged event survives the loss of a node.
    pub num_replicas: usize,
}

/// How long streams keep events by default.
pub const DEFAULT_STREAM_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Default bound of each stream: 1 GiB (`STREAM_MAX_BYTES`).
pub const DEFAULT_STREAM_MAX_BYTES: i64 = 1 << 30;

impl StreamSpec {
    /// A file-backed, limits-retention stream with production defaults: 7 days, 2-minute
    /// duplicate window, 1 MiB messages, 1 GiB in all.
    pub fn new(name: &str, subjects: &[&str]) -> Self {
        Self {
            name: name.to_owned(),
            subjects: subjects.iter().map(|s| (*s).to_owned()).collect(),
            max_age: DEFAULT_STREAM_MAX_AGE,
            duplicate_window: Duration::from_secs(120),
            max_msg_size: 1024 * 1024,
            max_bytes: DEFAULT_STREAM_MAX_BYTES,
            num_replicas: 1,
        }
    }

    fn config(&self) -> StreamConfig {
        StreamConfig {
            name: self.name.clone(),
            subjects: self.subjects.clone(),
            max_age: self.max_age,
            duplicate_window: self.duplicate_window,
            max_message_size: self.max_msg_size,
            max_bytes: self.max_bytes,
            storage: StorageType::File,
            discard: DiscardPolicy::New,
            num_replicas: self.num_replicas,
            ..Default::default()
        }
    }
}

/// Create the stream, or update it to `spec` if it exists with another configuration.
pub async fn ensure_stream(js: &Context, spec: &StreamSpec) -> Result<(), NatsError> {
    let wanted = spec.config();
    let err = |e: &dyn std::fmt::Display| NatsError::Stream {
        stream: spec.name.clone(),
        reason: e.to_string(),
    };
    match js.get_stream(&spec.name).await {
        Ok(mut stream) => {
            let info = stream.info().await.map_err(|e| err(&e))?;
            let current = &info.config;
            if current.subjects != wanted.subjects
                || current.max_age != wanted.max_age
                || current.duplicate_window != wanted.duplicate_window
                || current.max_message_size != wanted.max_message_size
                || current.max_bytes != wanted.max_bytes
                || current.discard != wanted.discard
                // The server moves an existing stream to more or fewer replicas in place.
                || current.num_replicas != wanted.num_replicas
            {
                js.update_stream(wanted).await.map_err(|e| err(&e))?;
                tracing::info!(stream = %spec.name, "stream updated");
            }
        }
        Err(_) => {
            js.create_stream(wanted).await.map_err(|e| err(&e))?;
            tracing::info!(stream = %spec.name, "stream created");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_servers_older_than_2_10() {
        assert!(check_server_version("2.9.10").is_err());
        assert!(check_server_version("1.4.0").is_err());
        assert!(check_server_version("").is_err());
        assert!(check_server_version("2.10.0").is_ok());
        assert!(check_server_version("2.15.1").is_ok());
        assert!(check_server_version("3.0.0-beta").is_ok());
        assert!(!server_version_at_least("2.10.29", (2, 11)));
        assert!(server_version_at_least("v2.11.0", (2, 11)));
    }

    #[test]
    fn a_comma_separated_url_list_names_every_node() {
        let addrs = server_addrs("nats://a:4222, nats://b:4223,nats://c:4224").unwrap();
        let hosts: Vec<(String, u16)> = addrs
            .iter()
            .map(|a| (a.host().to_owned(), a.port()))
            .collect();
        assert_eq!(
            hosts,
            [("a".into(), 4222), ("b".into(), 4223), ("c".into(), 4224)]
        );
        assert_eq!(server_addrs("nats://127.0.0.1:4222").unwrap().len(), 1);
        assert!(server_addrs("").is_err());
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("nats://a:4222,nats://b:notaport").is_err());
    }
}
