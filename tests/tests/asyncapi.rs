//! Keeps `docs/asyncapi.yaml` honest against the code: every event type a service announces or
//! consumes has a channel and no channel is left over, every durable consumer is documented, and
//! the receivers of each channel are exactly the durables whose filter subjects match it. What the
//! code does is read from each service's own wiring (`<service>::wiring()`), the same data the
//! services start from.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use saga_e2e::invariants::consumers;
use serde_json::Value;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the e2e crate lives one level below the repository root")
        .to_path_buf()
}

fn read(relative: &str) -> String {
    let path = repo_root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// `docs/asyncapi.yaml`, as a JSON value (so JSON pointers can follow its `$ref`s).
fn document() -> Value {
    serde_yaml::from_str(&read("docs/asyncapi.yaml"))
        .unwrap_or_else(|e| panic!("docs/asyncapi.yaml is not valid YAML: {e}"))
}

/// Every event type the services announce or consume, with the services that do.
fn source_types() -> BTreeMap<String, BTreeSet<String>> {
    let mut types: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for wiring in [
        order_service::wiring(),
        inventory_service::wiring(),
        payment_service::wiring(),
    ] {
        let consumed = wiring.durables.iter().flat_map(|d| d.event_types.iter());
        for ty in wiring.publishes.iter().chain(consumed) {
            types
                .entry((*ty).to_owned())
                .or_default()
                .insert(wiring.service.to_owned());
        }
    }
    types
}

/// A durable consumer as its service declares it.
#[derive(Debug)]
struct Consumer {
    durable: String,
    filters: Vec<String>,
    file: String,
}

fn source_consumers() -> Vec<Consumer> {
    consumers()
        .iter()
        .map(|c| Consumer {
            durable: c.durable.to_owned(),
            filters: c.filters.clone(),
            file: format!("{}::wiring()", c.service.binary().replace('-', "_")),
        })
        .collect()
}

/// NATS subject matching: `*` is one token, `>` one or more trailing tokens.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut subject_tokens = subject.split('.');
    for token in filter.split('.') {
        match (token, subject_tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (t, Some(s)) if t == s => {}
            _ => return false,
        }
    }
    subject_tokens.next().is_none()
}

fn object<'a>(value: &'a Value, what: &str) -> &'a serde_json::Map<String, Value> {
    value
        .as_object()
        .unwrap_or_else(|| panic!("{what} must be a mapping"))
}

/// Channel id → address.
fn channel_addresses(doc: &Value) -> BTreeMap<String, String> {
    object(&doc["channels"], "channels")
        .iter()
        .map(|(id, channel)| {
            let address = channel["address"]
                .as_str()
                .unwrap_or_else(|| panic!("channel {id} has no string address"));
            (id.clone(), address.to_owned())
        })
        .collect()
}

/// Follow a local `$ref` (`#/a/b`) inside the document.
fn resolve<'a>(doc: &'a Value, reference: &str) -> Option<&'a Value> {
    doc.pointer(reference.strip_prefix('#')?)
}

/// The `$ref` string of `value`, if it is a reference.
fn reference(value: &Value) -> Option<&str> {
    value.get("$ref").and_then(Value::as_str)
}

/// The channel id an operation's `channel: {$ref: '#/channels/<id>'}` points at.
fn operation_channel(id: &str, operation: &Value) -> String {
    let target = reference(&operation["channel"])
        .unwrap_or_else(|| panic!("operation {id}: channel must be a $ref"));
    target
        .strip_prefix("#/channels/")
        .filter(|rest| !rest.contains('/'))
        .unwrap_or_else(|| panic!("operation {id}: {target:?} is not a channel reference"))
        .to_owned()
}

/// (channel id → durables) over the `receive` operations, each of which must name its durable.
fn documented_receivers(doc: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let mut receivers: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, operation) in object(&doc["operations"], "operations") {
        if operation["action"] != "receive" {
            continue;
        }
        let durable = operation["x-durable"]
            .as_str()
            .unwrap_or_else(|| panic!("receive operation {id} names no x-durable"));
        receivers
            .entry(operation_channel(id, operation))
            .or_default()
            .insert(durable.to_owned());
    }
    receivers
}

/// The message objects of a channel, with their references resolved.
fn channel_messages<'a>(doc: &'a Value, channel_id: &str) -> Vec<(String, &'a Value)> {
    object(
        &doc["channels"][channel_id]["messages"],
        &format!("channels.{channel_id}.messages"),
    )
    .iter()
    .map(|(name, message)| {
        let resolved = match reference(message) {
            Some(target) => resolve(doc, target).unwrap_or_else(|| {
                panic!("channel {channel_id}: message {name} refers to missing {target}")
            }),
            None => message,
        };
        (name.clone(), resolved)
    })
    .collect()
}

#[test]
fn the_document_is_asyncapi_3() {
    let doc = document();
    let version = doc["asyncapi"]
        .as_str()
        .expect("`asyncapi` must be a string");
    assert!(version.starts_with("3."), "asyncapi is {version:?}");
    for section in ["info", "servers", "channels", "operations", "components"] {
        assert!(doc[section].is_object(), "missing section {section}");
    }
    for section in ["messages", "schemas"] {
        assert!(
            doc["components"][section].is_object(),
            "missing components.{section}"
        );
    }
    assert!(
        doc["components"]["schemas"]["CloudEvent"].is_object(),
        "the envelope schema components.schemas.CloudEvent is missing"
    );
}

#[test]
fn every_event_type_has_a_channel_at_its_subject() {
    let doc = document();
    let addresses: BTreeSet<String> = channel_addresses(&doc).into_values().collect();
    let missing: Vec<String> = source_types()
        .into_iter()
        .filter(|(ty, _)| !addresses.contains(ty))
        .map(|(ty, files)| format!("{ty} (declared in {files:?})"))
        .collect();
    assert!(
        missing.is_empty(),
        "event types without a channel in docs/asyncapi.yaml: {missing:#?}"
    );
}

#[test]
fn no_channel_is_stale() {
    let doc = document();
    let types = source_types();
    let mut seen = BTreeSet::new();
    let mut problems = Vec::new();
    for (id, address) in channel_addresses(&doc) {
        if !types.contains_key(&address) {
            problems.push(format!(
                "channel {id}: {address:?} is a type no service announces or consumes"
            ));
        }
        if !seen.insert(address.clone()) {
            problems.push(format!("channel {id}: address {address:?} is used twice"));
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn every_durable_consumer_is_documented() {
    let doc = document();
    let text = read("docs/asyncapi.yaml");
    let documented: BTreeSet<String> = documented_receivers(&doc).into_values().flatten().collect();
    let mut problems = Vec::new();
    let mut durables = BTreeSet::new();
    for consumer in source_consumers() {
        if !text.contains(&consumer.durable) {
            problems.push(format!(
                "durable {:?} ({}) does not appear in the document",
                consumer.durable, consumer.file
            ));
        } else if !documented.contains(&consumer.durable) {
            problems.push(format!(
                "durable {:?} ({}) is named by no receive operation",
                consumer.durable, consumer.file
            ));
        }
        durables.insert(consumer.durable);
    }
    for durable in documented.difference(&durables) {
        problems.push(format!(
            "receive operations name durable {durable:?}, which no service declares"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn each_channel_is_received_by_exactly_the_durables_whose_filters_match_it() {
    let doc = document();
    let consumers = source_consumers();
    let receivers = documented_receivers(&doc);
    let mut problems = Vec::new();
    for (id, address) in channel_addresses(&doc) {
        let expected: BTreeSet<String> = consumers
            .iter()
            .filter(|c| c.filters.iter().any(|f| subject_matches(f, &address)))
            .map(|c| c.durable.clone())
            .collect();
        let operations = receivers.get(&id).cloned().unwrap_or_default();
        if operations != expected {
            problems.push(format!(
                "{address}: receive operations name {operations:?}, the sources consume it with {expected:?}"
            ));
        }
        for (name, message) in channel_messages(&doc, &id) {
            let listed: BTreeSet<String> = message["x-consumers"]
                .as_array()
                .unwrap_or_else(|| panic!("message {name} has no x-consumers list"))
                .iter()
                .filter_map(|c| c["durable"].as_str().map(str::to_owned))
                .collect();
            if listed != expected {
                problems.push(format!(
                    "{address}: message {name} lists consumers {listed:?}, the sources consume it with {expected:?}"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn messages_and_operations_hang_together() {
    let doc = document();
    let addresses = channel_addresses(&doc);
    let mut problems = Vec::new();
    let mut sent = BTreeSet::new();

    for (id, address) in &addresses {
        let messages = channel_messages(&doc, id);
        if messages.is_empty() {
            problems.push(format!("channel {id} has no message"));
        }
        for (name, message) in messages {
            for field in ["name", "x-cloudevents-type", "x-nats-subject"] {
                if message[field].as_str() != Some(address.as_str()) {
                    problems.push(format!(
                        "channel {id}: message {name}.{field} is {}, not {address:?}",
                        message[field]
                    ));
                }
            }
            for field in ["x-version", "x-stream", "x-producer", "payload"] {
                if message[field].is_null() {
                    problems.push(format!("channel {id}: message {name} has no {field}"));
                }
            }
        }
    }

    for (id, operation) in object(&doc["operations"], "operations") {
        let action = operation["action"].as_str().unwrap_or_default();
        if action != "send" && action != "receive" {
            problems.push(format!("operation {id}: action {action:?}"));
        }
        let channel = operation_channel(id, operation);
        if !addresses.contains_key(&channel) {
            problems.push(format!("operation {id}: no channel {channel}"));
            continue;
        }
        if action == "send" {
            sent.insert(channel.clone());
        }
        let prefix = format!("#/channels/{channel}/messages/");
        for message in operation["messages"].as_array().into_iter().flatten() {
            match reference(message) {
                Some(target) if target.starts_with(&prefix) && resolve(&doc, target).is_some() => {}
                other => problems.push(format!(
                    "operation {id}: message {other:?} is not one of channel {channel}'s messages"
                )),
            }
        }
    }
    for id in addresses.keys().filter(|id| !sent.contains(*id)) {
        problems.push(format!(
            "channel {id}: no send operation (who produces it?)"
        ));
    }
    assert!(problems.is_empty(), "{problems:#?}");
}

#[test]
fn subject_matching_follows_nats_wildcards() {
    assert!(subject_matches("cmd.orders.>", "cmd.orders.place.v1"));
    assert!(!subject_matches("cmd.orders.>", "cmd.orders"));
    assert!(subject_matches("orders.*.v1", "orders.placed.v1"));
    assert!(!subject_matches("orders.*.v1", "orders.placed.v2"));
    assert!(subject_matches("payments.failed.v1", "payments.failed.v1"));
    assert!(!subject_matches(
        "payments.failed.v1",
        "payments.failed.v1.x"
    ));
    assert!(!subject_matches(
        "payments.failed.v1.x",
        "payments.failed.v1"
    ));
}
