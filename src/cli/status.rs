//! `lakesink status` printed for people: a table of every sink's partitions, then what stops
//! any of them.

/// `status` as a table for people: one line per sink and partition, then what stops any of
/// them (quarantined, or unreadable at its position).
pub(super) fn print_status(rows: &[lakesink::app::PartitionStatus]) {
    println!(
        "{:<16} {:<32} {:>9} {:>14} {:>14} {:>10}  {:<20}  TABLE",
        "SINK", "TOPIC", "PARTITION", "COMMITTED", "END", "LAG", "LAST COMMIT"
    );
    for r in rows {
        let flag = if r.quarantined.is_some() {
            "  QUARANTINED"
        } else if r.unreadable.is_some() {
            "  UNREADABLE"
        } else {
            ""
        };
        println!(
            "{:<16} {:<32} {:>9} {:>14} {:>14} {:>10}  {:<20}  {}{flag}",
            r.sink,
            r.topic,
            r.partition,
            r.committed.map_or("-".to_string(), |c| c.to_string()),
            r.end,
            r.lag,
            r.last_commit.as_deref().unwrap_or("-"),
            r.table
        );
    }
    for r in rows {
        if let Some(why) = &r.quarantined {
            println!(
                "sink `{}`: {}/{} is quarantined: {why}",
                r.sink, r.topic, r.partition
            );
        }
        if let Some(why) = &r.unreadable {
            println!(
                "sink `{}`: {}/{} cannot be read: {why}",
                r.sink, r.topic, r.partition
            );
        }
    }
}
