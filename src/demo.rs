//! `hapg demo`: a monitor and two nodes on free ports under one directory.
use anyhow::{bail, Result};

use crate::DemoArgs;

/// Runs the demo.
pub async fn run(args: DemoArgs) -> Result<()> {
    let _ = args;
    bail!("demo is not built yet")
}
