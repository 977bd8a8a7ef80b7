//! Reading a Delta table back (the bench and `lakesink status` check what landed): SQL over
//! the table, and the data files it references.

use arrow::array::RecordBatch;
use deltalake::{DeltaTableBuilder, DeltaTableError};
use url::Url;

use super::*;

/// Runs `sql` over the Delta table at `location` (a URL), registered as `t`: what the bench reads
/// back to check what an upsert left.
pub async fn query(
    location: &str,
    sql: &str,
) -> std::result::Result<Vec<RecordBatch>, DeltaTableError> {
    register_handlers();
    let url =
        Url::parse(location).map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
    let mut table = DeltaTableBuilder::from_url(url)?.build()?;
    table.load().await?;
    let ctx = deltalake::datafusion::prelude::SessionContext::new();
    ctx.register_table("t", table.table_provider().await?)?;
    Ok(ctx.sql(sql).await?.collect().await?)
}

/// The data files the Delta table at `location` (a URL) references now, and their bytes: what
/// upserts leave, since their commits replace files (what they committed does not add up to it).
pub async fn live_files(location: &str) -> std::result::Result<(usize, u64), DeltaTableError> {
    register_handlers();
    let url =
        Url::parse(location).map_err(|e| DeltaTableError::InvalidTableLocation(e.to_string()))?;
    let mut table = DeltaTableBuilder::from_url(url)?.build()?;
    table.load().await?;
    let (mut files, mut bytes) = (0, 0);
    for f in table.snapshot()?.log_data().iter() {
        files += 1;
        bytes += f.size().max(0) as u64;
    }
    Ok((files, bytes))
}
