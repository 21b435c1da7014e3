//! Topic names of the gateway protocol (protocol.md §2): parsing what arrives, formatting what
//! fwrepo publishes.

/// What an inbound topic says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Inbound {
    /// `thing/product/{sn}/osd`.
    Osd(String),
    /// `thing/product/{sn}/state`.
    State(String),
    /// `thing/product/{sn}/events`.
    Events(String),
    /// `thing/product/{sn}/services_reply`.
    ServicesReply(String),
    /// `sys/product/{sn}/status`.
    Status(String),
}

/// Parses a topic fwrepo subscribes to; `None` for anything else (unexpected levels included).
pub fn parse(topic: &str) -> Option<Inbound> {
    let levels: Vec<&str> = topic.split('/').collect();
    let [root, "product", sn, kind] = levels.as_slice() else {
        return None;
    };
    if sn.is_empty() || sn.len() > 128 {
        return None;
    }
    let sn = sn.to_string();
    match (*root, *kind) {
        ("thing", "osd") => Some(Inbound::Osd(sn)),
        ("thing", "state") => Some(Inbound::State(sn)),
        ("thing", "events") => Some(Inbound::Events(sn)),
        ("thing", "services_reply") => Some(Inbound::ServicesReply(sn)),
        ("sys", "status") => Some(Inbound::Status(sn)),
        _ => None,
    }
}

/// Subscriptions at QoS 1 (contract §5).
pub const QOS1_FILTERS: [&str; 4] = [
    "thing/product/+/services_reply",
    "thing/product/+/events",
    "thing/product/+/state",
    "sys/product/+/status",
];

/// Subscription at QoS 0 (high volume).
pub const QOS0_FILTERS: [&str; 1] = ["thing/product/+/osd"];

/// `filter` as the subscription of a member of a shared-subscription `group`
/// (`$share/<group>/<filter>`: the broker hands each message to one member), or as is.
pub fn shared(group: Option<&str>, filter: &str) -> String {
    match group {
        Some(g) => format!("$share/{g}/{filter}"),
        None => filter.to_string(),
    }
}

/// Where replica `replica` of shared-subscription group `group` is handed gateway messages
/// that another replica received for a task it holds: `fwrepo/<group>/to/<replica>/` and
/// the message's own topic.
pub fn handed(group: &str, replica: &str, topic: &str) -> String {
    format!("fwrepo/{group}/to/{replica}/{topic}")
}

/// The subscription of replica `replica` to what is handed to it (QoS 1, not shared).
pub fn handed_filter(group: &str, replica: &str) -> String {
    handed(group, replica, "#")
}

/// Where the broker publishes the will of replica `replica` of group `group` when its
/// session's connection drops: `fwrepo/<group>/gone/<replica>`.
pub fn gone(group: &str, replica: &str) -> String {
    format!("fwrepo/{group}/gone/{replica}")
}

/// The subscription of every replica of group `group` to the others' wills (QoS 1, not
/// shared).
pub fn gone_filter(group: &str) -> String {
    gone(group, "+")
}

/// The replica whose will `topic` carries (any group: an adopted session may hold wills).
pub fn gone_replica(topic: &str) -> Option<&str> {
    own("gone", topic).filter(|replica| !replica.is_empty() && !replica.contains('/'))
}

/// The gateway topic of a message handed to a replica (any replica of any group: a replica
/// that adopts a dead one's session takes in what was handed to it).
pub fn unhand(topic: &str) -> Option<&str> {
    own("to", topic)?
        .split_once('/')
        .map(|(_replica, inner)| inner)
}

/// What follows `fwrepo/<group>/<kind>/` in one of fwrepo's own topics of that kind.
fn own<'a>(kind: &str, topic: &'a str) -> Option<&'a str> {
    let mut parts = topic.strip_prefix("fwrepo/")?.splitn(3, '/');
    let (_group, k, rest) = (parts.next()?, parts.next()?, parts.next()?);
    (k == kind).then_some(rest)
}

/// `sys/product/{gateway_sn}/status` (a gateway's topology; up).
pub fn status(gateway_sn: &str) -> String {
    format!("sys/product/{gateway_sn}/status")
}

/// `thing/product/{sn}/state` (up).
pub fn state(sn: &str) -> String {
    format!("thing/product/{sn}/state")
}

/// `thing/product/{sn}/osd` (up).
pub fn osd(sn: &str) -> String {
    format!("thing/product/{sn}/osd")
}

/// `thing/product/{gateway_sn}/events` (up).
pub fn events(gateway_sn: &str) -> String {
    format!("thing/product/{gateway_sn}/events")
}

/// `thing/product/{gateway_sn}/services_reply` (up).
pub fn services_reply(gateway_sn: &str) -> String {
    format!("thing/product/{gateway_sn}/services_reply")
}

/// `thing/product/{gateway_sn}/services`.
pub fn services(gateway_sn: &str) -> String {
    format!("thing/product/{gateway_sn}/services")
}

/// `thing/product/{gateway_sn}/events_reply`.
pub fn events_reply(gateway_sn: &str) -> String {
    format!("thing/product/{gateway_sn}/events_reply")
}

/// `sys/product/{gateway_sn}/status_reply`.
pub fn status_reply(gateway_sn: &str) -> String {
    format!("sys/product/{gateway_sn}/status_reply")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handed_message_keeps_its_gateway_topic() {
        let t = handed("fwrepo", "r2", "thing/product/D1/events");
        assert_eq!(t, "fwrepo/fwrepo/to/r2/thing/product/D1/events");
        assert_eq!(unhand(&t), Some("thing/product/D1/events"));
        assert_eq!(handed_filter("g", "r1"), "fwrepo/g/to/r1/#");
        assert_eq!(unhand("thing/product/D1/events"), None);
        assert_eq!(unhand("fwrepo/g/from/r1/thing/product/D1/events"), None);
        assert_eq!(unhand("fwrepo/g/to/r1"), None);
    }

    #[test]
    fn a_will_names_its_replica() {
        assert_eq!(gone("g", "r2"), "fwrepo/g/gone/r2");
        assert_eq!(gone_filter("g"), "fwrepo/g/gone/+");
        assert_eq!(gone_replica(&gone("g", "r2")), Some("r2"));
        assert_eq!(gone_replica("fwrepo/g/gone/"), None);
        assert_eq!(gone_replica("fwrepo/g/gone/r2/x"), None);
        assert_eq!(gone_replica("fwrepo/g/to/r2/thing/product/D1/events"), None);
        assert_eq!(gone_replica("thing/product/D1/events"), None);
    }

    #[test]
    fn parses_known_topics_only() {
        assert_eq!(
            parse("thing/product/DOCK1/osd"),
            Some(Inbound::Osd("DOCK1".into()))
        );
        assert_eq!(
            parse("sys/product/D/status"),
            Some(Inbound::Status("D".into()))
        );
        assert_eq!(
            parse("thing/product/D/services_reply"),
            Some(Inbound::ServicesReply("D".into()))
        );
        for bad in [
            "thing/product/D",
            "thing/product/D/osd/x",
            "thing/product//osd",
            "x/product/D/osd",
            "thing/product/D/services",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(services("D"), "thing/product/D/services");
    }
}
