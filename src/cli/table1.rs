//! `eval --table1 OUT.md`: writes the table of `backlens::eval::table1` as Markdown (OUT.md)
//! and JSON (OUT.json).

use anyhow::Result;
use backlens::eval::table1::{markdown, Table};

/// Writes `OUT.md` and `OUT.json` through their claims.
pub fn write(
    t: &Table,
    md: backlens::write::OutputClaim,
    json: backlens::write::OutputClaim,
) -> Result<()> {
    let mut f = md.stage_file()?;
    f.write_all(markdown(t).as_bytes())?;
    let mut j = json.stage_file()?;
    j.write_all(serde_json::to_string_pretty(t)?.as_bytes())?;
    j.write_all(b"\n")?;
    f.commit()?;
    j.commit()?;
    Ok(())
}
