use super::*;
use arrow::array::{Int64Array, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{Field, Schema};
use std::sync::Arc;

#[test]
fn parses_specs() {
    assert_eq!(
        PartitionSpec::parse("day(ts)").unwrap(),
        PartitionSpec::Day("ts".into())
    );
    assert_eq!(
        PartitionSpec::parse("country").unwrap(),
        PartitionSpec::Field("country".into())
    );
    assert!(PartitionSpec::parse("month(ts)").is_err());
    assert!(PartitionSpec::parse("a/b").is_err());
}

#[test]
fn escaping_never_leaves_the_segment() {
    for v in ["..", ".", "a/b", "../../etc", "x=y", "%2F", "a\nb", "/abs"] {
        let e = escape(v);
        assert!(!e.contains('/'), "{v} -> {e}");
        assert!(e != "." && e != "..", "{v} -> {e}");
        assert!(!e.contains('='), "{v} -> {e}");
    }
    assert_eq!(escape(""), HIVE_NULL);
    assert_eq!(escape("DE"), "DE");
}

#[test]
fn splits_by_day_and_field_and_drops_field_columns() {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new("country", DataType::Utf8, true),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, Some("+00:00".into())),
            false,
        ),
    ]));
    let day = 86_400_000;
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3])),
            Arc::new(StringArray::from(vec![Some("DE"), None, Some("DE")])),
            Arc::new(
                TimestampMillisecondArray::from(vec![0, day + 3_600_000, 1])
                    .with_timezone("+00:00"),
            ),
        ],
    )
    .unwrap();
    let specs = [
        PartitionSpec::parse("day(ts)").unwrap(),
        PartitionSpec::parse("country").unwrap(),
    ];
    let parts = split(&batch, &specs, &TopicPartition::new("t", 0)).unwrap();
    let keys: Vec<_> = parts
        .iter()
        .map(|(k, b)| (k.as_str(), b.num_rows()))
        .collect();
    assert_eq!(
        keys,
        vec![
            ("day=1970-01-01/country=DE", 2),
            ("day=1970-01-02/country=__HIVE_DEFAULT_PARTITION__", 1)
        ]
    );
    assert!(parts[0].1.column_by_name("country").is_none());
    assert!(parts[0].1.column_by_name("ts").is_some());
}

#[test]
fn groups_interleaved_rows_in_first_appearance_order() {
    let col: ArrayRef = Arc::new(StringArray::from(vec![
        Some("b"),
        Some("a"),
        Some("b"),
        None,
        Some("a"),
        None,
    ]));
    let groups = group_rows(&[col], 6).unwrap();
    assert_eq!(groups, vec![vec![0, 2], vec![1, 4], vec![3, 5]]);
    assert!(group_rows(&[], 0).unwrap().is_empty());
}

#[test]
fn derived_day_and_hour_match_the_formatted_values() {
    let hour = 3_600_000;
    // Before 1970, across midnight, a run, a null and a return to an earlier hour.
    let ts: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![
        Some(-1),
        Some(0),
        Some(1),
        None,
        Some(25 * hour + 5),
        Some(2),
    ]));
    let (dt, days) = derived_column(&PartitionSpec::Day("ts".into()), &ts).unwrap();
    assert_eq!(dt, DataType::Date32);
    let days = days.as_primitive::<arrow::datatypes::Date32Type>();
    assert_eq!(
        days.iter().collect::<Vec<_>>(),
        vec![Some(-1), Some(0), Some(0), None, Some(1), Some(0)]
    );
    let (_, hours) = derived_column(&PartitionSpec::Hour("ts".into()), &ts).unwrap();
    let expected: Vec<Option<String>> =
        segment_values(&PartitionSpec::Hour("ts".into()), &ts).unwrap();
    assert_eq!(
        hours
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect::<Vec<_>>(),
        expected
    );
    assert_eq!(expected[0].as_deref(), Some("1969-12-31-23"));
    let out_of_range: ArrayRef = Arc::new(TimestampMillisecondArray::from(vec![i64::MAX]));
    let e = derived_column(&PartitionSpec::Day("ts".into()), &out_of_range).unwrap_err();
    assert!(e.contains("out of range"), "{e}");
}

#[test]
fn splits_interleaved_hours_keeping_row_order() {
    let hour = 3_600_000;
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Int64, false),
        Field::new(
            "ts",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(Int64Array::from(vec![1, 2, 3, 4])),
            Arc::new(TimestampMillisecondArray::from(vec![hour, 0, hour + 1, 5])),
        ],
    )
    .unwrap();
    let parts = split(
        &batch,
        &[PartitionSpec::parse("hour(ts)").unwrap()],
        &TopicPartition::new("t", 0),
    )
    .unwrap();
    let got: Vec<(String, Vec<i64>)> = parts
        .iter()
        .map(|(k, b)| {
            (
                k.clone(),
                b.column(0)
                    .as_primitive::<arrow::datatypes::Int64Type>()
                    .values()
                    .to_vec(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            ("hour=1970-01-01-00".to_string(), vec![2, 4]),
            ("hour=1970-01-01-01".to_string(), vec![1, 3]),
        ]
    );
}
