//! The binaries' settings: `--help` lists the variables and exits at once (no NATS needed); a bad
//! value stops the start at once, naming the variable, before anything is connected.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use saga_e2e::bin_dir;

const SERVICES: [&str; 3] = ["order-service", "inventory-service", "payment-service"];

/// Run `binary` with `args` and `env` (nothing else from this process's settings), within 10 s.
fn run(binary: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(bin_dir().join(binary));
    command
        .args(args)
        // Nothing listens here: a binary that got as far as connecting would hang, not pass.
        .env("NATS_URL", "nats://127.0.0.1:1")
        .env("DATABASE_URL", "sqlite::memory:")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        command.env(k, v);
    }
    let mut child = command.spawn().expect("spawn");
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("{binary} {args:?} {env:?} did not exit within 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

#[test]
fn help_lists_every_variable_and_exits_at_once() {
    for binary in SERVICES {
        let out = run(binary, &["--help"], &[]);
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{binary} --help: {:?}", out.status);
        for variable in [
            "NATS_URL",
            "NATS_PASSWORD",
            "DATABASE_URL",
            "SQLITE_SYNCHRONOUS",
            "ADMIN_TOKEN",
            "STREAM_MAX_BYTES",
            "HTTP_MAX_IN_FLIGHT",
            "INBOX_RETENTION",
        ] {
            assert!(help.contains(variable), "{binary} --help lacks {variable}");
        }
    }
    let payment =
        String::from_utf8_lossy(&run("payment-service", &["--help"], &[]).stdout).into_owned();
    assert!(
        payment.contains("PAYMENT_GATEWAY_TIMEOUT_EVERY"),
        "{payment}"
    );
    let order =
        String::from_utf8_lossy(&run("order-service", &["--help"], &[]).stdout).into_owned();
    assert!(order.contains("ORDER_DEADLINE_MS") && order.contains("[default: 30000]"));
}

#[test]
fn a_bad_value_stops_the_start_naming_the_variable() {
    let cases: [(&str, &str, &str); 4] = [
        ("order-service", "SQLITE_SYNCHRONOUS", "bogus"),
        ("inventory-service", "HTTP_MAX_IN_FLIGHT", "0"),
        ("payment-service", "PAYMENT_GATEWAY_TIMEOUT_EVERY", "often"),
        ("order-service", "OUTBOX_RETENTION", "a while"),
    ];
    for (binary, variable, value) in cases {
        let out = run(
            binary,
            &[],
            &[(variable, value), ("ADMIN_TOKEN", "s3cret-token")],
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{binary} took {variable}={value}");
        assert!(stderr.contains(variable), "{binary}: {stderr}");
        assert!(!stderr.contains("s3cret-token"), "{binary}: {stderr}");
    }
    let out = run("order-service", &[], &[("SQLITE_SYNCHRONOUS", "bogus")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("NORMAL") && stderr.contains("FULL"),
        "{stderr}"
    );
}
