//! Configuration values: secrets that never reach a log line and, with feature `service`, settings
//! read by clap from the environment (each variable also has a `--flag`), so `<binary> --help` lists
//! them all with their defaults and a bad value stops the start naming the variable.

use std::convert::Infallible;
use std::fmt;
use std::str::FromStr;

/// A password or token: its `Debug` and `Display` show `<redacted>`, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value.
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    /// The value, for the one place that needs it (a connection, a comparison).
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The value, consumed.
    pub fn into_inner(self) -> String {
        self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl FromStr for Secret {
    type Err = Infallible;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_owned()))
    }
}

/// A URL (or a comma-separated list of them) with the password of each userinfo replaced, for
/// logs: `postgres://app:pw@db/x` becomes `postgres://app:<redacted>@db/x`.
pub fn redact_url(urls: &str) -> String {
    urls.split(',')
        .map(|url| {
            let Some((scheme, rest)) = url.split_once("://") else {
                return url.to_owned();
            };
            let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let (authority, tail) = rest.split_at(authority_end);
            match authority.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let shown = match userinfo.split_once(':') {
                        Some((user, _)) => format!("{user}:<redacted>"),
                        // A lone userinfo may be a token (`nats://token@host`).
                        None => "<redacted>".to_owned(),
                    };
                    format!("{scheme}://{shown}@{host}{tail}")
                }
                None => url.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(feature = "service")]
pub use cli::*;

#[cfg(feature = "service")]
mod cli {
    use std::ffi::OsString;
    use std::time::Duration;

    use clap::{Arg, Command, FromArgMatches};

    /// Variables read by the logging and tracing set-up (and the OpenTelemetry SDK), which runs
    /// before the settings are parsed.
    const OBSERVABILITY_HELP: &str = "Logs and traces: RUST_LOG (default info), LOG_FORMAT=json \
        for JSON lines, OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT (unset: \
        spans are not exported), OTEL_SERVICE_NAME (default: the binary's name), \
        OTEL_SDK_DISABLED=true, and the SDK's OTEL_BSP_* and OTEL_TRACES_SAMPLER[_ARG].\n\
        A variable set to an empty value counts as unset; each flag overrides its variable.";

    /// Read a service's settings from its command line and environment. `--help` prints every
    /// variable with its default and exits; a bad value prints what is wrong (naming the variable
    /// and, where there is a list, the allowed values) and exits with status 2.
    ///
    /// `T` flattens [`crate::service::ServiceConfig`]; `name` gives the default `DATABASE_URL`
    /// (`sqlite://data/<name>.db`) and `http_addr` the default `HTTP_ADDR`.
    pub fn parse<T: clap::Parser>(name: &str, http_addr: &str) -> T {
        try_parse_from(name, http_addr, std::env::args_os()).unwrap_or_else(|e| e.exit())
    }

    /// [`parse`] over the given arguments (the first is the program name) instead of the
    /// process's; the environment is still read.
    pub fn try_parse_from<T, I, A>(name: &str, http_addr: &str, args: I) -> Result<T, clap::Error>
    where
        T: clap::Parser,
        I: IntoIterator<Item = A>,
        A: Into<OsString> + Clone,
    {
        let command = T::command()
            .name(name.to_owned())
            .after_help(OBSERVABILITY_HELP)
            .mut_arg("database_url", |a| {
                a.default_value(crate::db::default_sqlite_url(name))
                    .required(false)
            })
            .mut_arg("http_addr", |a| {
                a.default_value(http_addr.to_owned()).required(false)
            });
        try_parse_command(command, args)
    }

    /// Read settings that are not a whole service's (e.g. [`crate::edge::EdgeLimits`] in a
    /// program with settings of its own) from the environment alone.
    pub fn from_env<T: clap::Args + FromArgMatches>() -> Result<T, clap::Error> {
        let name = std::env::args()
            .next()
            .and_then(|p| {
                std::path::Path::new(&p)
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "service".to_owned());
        try_parse_command(T::augment_args(Command::new(name)), [OsString::new()])
    }

    fn try_parse_command<T, I, A>(command: Command, args: I) -> Result<T, clap::Error>
    where
        T: FromArgMatches,
        I: IntoIterator<Item = A>,
        A: Into<OsString> + Clone,
    {
        let mut command = command.mut_args(env_conventions);
        let matches = command.try_get_matches_from_mut(args)?;
        T::from_arg_matches(&matches).map_err(|e| e.format(&mut command))
    }

    /// How every variable behaves: set but blank counts as unset (as it always has: compose files
    /// write `ADMIN_TOKEN=`); its current value never shows in `--help` (it may be a secret); and
    /// errors name the variable.
    fn env_conventions(arg: Arg) -> Arg {
        let Some(variable) = arg.get_env().map(|v| v.to_string_lossy().into_owned()) else {
            return arg;
        };
        let blank =
            std::env::var_os(&variable).is_some_and(|v| v.to_string_lossy().trim().is_empty());
        let arg = arg.hide_env_values(true).value_name(variable);
        if blank {
            arg.env(None)
        } else {
            arg
        }
    }

    /// A whole number; surrounding blanks are ignored.
    pub fn number<T>(text: &str) -> Result<T, String>
    where
        T: std::str::FromStr,
        T::Err: std::fmt::Display,
    {
        text.trim()
            .parse()
            .map_err(|e| format!("{e} (a whole number is expected)"))
    }

    /// A whole number greater than zero.
    pub fn positive<T>(text: &str) -> Result<T, String>
    where
        T: std::str::FromStr + Default + PartialOrd,
        T::Err: std::fmt::Display,
    {
        let n: T = number(text)?;
        if n > T::default() {
            Ok(n)
        } else {
            Err("must be greater than zero".into())
        }
    }

    /// Milliseconds, as a whole number.
    pub fn millis(text: &str) -> Result<Duration, String> {
        number(text).map(Duration::from_millis)
    }

    /// Milliseconds, greater than zero.
    pub fn positive_millis(text: &str) -> Result<Duration, String> {
        positive(text).map(Duration::from_millis)
    }

    /// A duration such as `1d`, `36h`, `90s` or `500ms`.
    pub fn duration(text: &str) -> Result<Duration, String> {
        humantime::parse_duration(text.trim()).map_err(|e| format!("{e} (examples: 1d, 36h, 90s)"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_and_url_passwords_never_show_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?} {s}"), "<redacted> <redacted>");
        assert_eq!(s.expose(), "hunter2");
        assert_eq!(
            redact_url("postgres://app:hunter2@db:5432/orders?sslmode=require"),
            "postgres://app:<redacted>@db:5432/orders?sslmode=require"
        );
        assert_eq!(
            redact_url("nats://a:pw@n1:4222,nats://tok@n2"),
            "nats://a:<redacted>@n1:4222,nats://<redacted>@n2"
        );
        assert_eq!(
            redact_url("sqlite://data/order-service.db"),
            "sqlite://data/order-service.db"
        );
    }
}

#[cfg(all(test, feature = "service"))]
mod cli_tests {
    use crate::service::ServiceConfig;

    #[derive(clap::Parser, Debug)]
    struct Settings {
        #[command(flatten)]
        service: ServiceConfig,
    }

    fn parse(args: &[&str]) -> Result<Settings, clap::Error> {
        let args = std::iter::once("test-service").chain(args.iter().copied());
        super::try_parse_from("test-service", "127.0.0.1:9", args)
    }

    #[test]
    fn a_bad_value_is_refused_naming_the_variable_and_the_allowed_values() {
        let err = parse(&["--sqlite-synchronous", "bogus"])
            .expect_err("bogus accepted")
            .to_string();
        assert!(err.contains("SQLITE_SYNCHRONOUS"), "{err}");
        assert!(err.contains("NORMAL") && err.contains("FULL"), "{err}");
        for (flag, value) in [
            ("--http-max-in-flight", "0"),
            ("--http-header-timeout-ms", "soon"),
            ("--stream-max-bytes", "-1"),
            ("--inbox-retention", "8 fortnights"),
        ] {
            assert!(parse(&[flag, value]).is_err(), "{flag} {value} accepted");
        }
        let ok = parse(&["--sqlite-synchronous", "full"]).expect("lower case");
        assert_eq!(
            ok.service.db.sqlite_synchronous,
            crate::db::SqliteSynchronous::Full
        );
    }

    #[test]
    fn defaults_are_today_s() {
        let s = parse(&[]).expect("defaults").service;
        if std::env::var_os("DATABASE_URL").is_none() {
            assert_eq!(s.database_url, "sqlite://data/test-service.db");
        }
        if std::env::var_os("HTTP_ADDR").is_none() {
            assert_eq!(s.http_addr, "127.0.0.1:9");
        }
        if std::env::var_os("INBOX_RETENTION").is_none() {
            assert_eq!(s.retention.inbox.as_secs(), 8 * 24 * 3600);
        }
    }

    #[test]
    fn the_stream_max_age_sets_the_inbox_floor() {
        // The default 8-day inbox outlives the default 7-day streams.
        let mut s = parse(&["--inbox-retention", "8d"]).expect("parse").service;
        assert!(s.named("svc").is_ok());
        // A 1-hour inbox is refused with 7-day streams, and fine with 30-minute ones.
        let mut s = parse(&["--inbox-retention", "1h"]).expect("parse").service;
        assert!(s.named("svc").is_err());
        let mut s = parse(&["--inbox-retention", "1h", "--stream-max-age", "30m"])
            .expect("parse")
            .service;
        assert!(s.named("svc").is_ok(), "{s:?}");
        assert_eq!(s.stream_max_age.as_secs(), 1800);
        assert!(parse(&["--stream-max-age", "soon"]).is_err());
    }

    #[test]
    fn secrets_are_redacted_in_debug() {
        let s = parse(&[
            "--nats-url",
            "nats://svc:natspw@127.0.0.1:4222",
            "--nats-password",
            "natspassword",
            "--admin-token",
            "admintoken123",
            "--database-url",
            "postgres://app:dbpassword@db/orders",
        ])
        .expect("parse");
        let shown = format!("{s:?}");
        for secret in ["natspw", "natspassword", "admintoken123", "dbpassword"] {
            assert!(!shown.contains(secret), "{secret} shown: {shown}");
        }
        assert!(
            shown.contains("postgres://app:<redacted>@db/orders"),
            "{shown}"
        );
    }

    #[test]
    fn help_lists_every_variable() {
        let err = parse(&["--help"]).expect_err("help");
        assert_eq!(err.kind(), clap::error::ErrorKind::DisplayHelp);
        let help = err.to_string();
        for variable in [
            "NATS_URL",
            "NATS_USER",
            "NATS_PASSWORD",
            "DATABASE_URL",
            "HTTP_ADDR",
            "SQLITE_SYNCHRONOUS",
            "ADMIN_TOKEN",
            "STREAM_MAX_BYTES",
            "HTTP_HEADER_TIMEOUT_MS",
            "HTTP_REQUEST_TIMEOUT_MS",
            "HTTP_MAX_IN_FLIGHT",
            "HTTP_MAX_CONNECTIONS",
            "OUTBOX_RETENTION",
            "INBOX_RETENTION",
            "DEAD_LETTER_RETENTION",
            "RETENTION_SWEEP_INTERVAL",
        ] {
            assert!(help.contains(variable), "{variable} missing:\n{help}");
        }
    }
}
