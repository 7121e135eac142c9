//! `rein costs`: spend from recorded model calls, grouped.

use crate::StoreArgs;
use crate::exit;
use anyhow::anyhow;
use rein_app::Error::BadInput;
use rein_app::render;
use rein_app::views;
use rein_app::wiring::open_existing_store;
use rein_core::TenantId;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub(crate) enum CostBy {
    Tenant,
    User,
    Agent,
    Model,
    Day,
}

impl CostBy {
    fn group(self) -> rein_store::CostGroup {
        match self {
            CostBy::Tenant => rein_store::CostGroup::Tenant,
            CostBy::User => rein_store::CostGroup::User,
            CostBy::Agent => rein_store::CostGroup::Agent,
            CostBy::Model => rein_store::CostGroup::Model,
            CostBy::Day => rein_store::CostGroup::Day,
        }
    }
}

pub(crate) async fn costs(
    by: CostBy,
    since: Option<&str>,
    tenant: &str,
    all_tenants: bool,
    json: bool,
    store: &StoreArgs,
) -> anyhow::Result<u8> {
    let since_ms = match since {
        None => 0,
        Some(day) => rein_core::time::parse_utc_day(day).ok_or_else(|| {
            anyhow!(BadInput(format!(
                "--since {day}: expected a UTC day as YYYY-MM-DD"
            )))
        })?,
    };
    let store = open_existing_store(&store.db).await?;
    let tenant = TenantId::new(tenant);
    let lines = store
        .costs((!all_tenants).then_some(&tenant), by.group(), since_ms)
        .await?;
    let total = lines
        .iter()
        .fold(rein_core::Usd::ZERO, |sum, l| sum + l.cost);
    if json {
        say!(
            "{}",
            serde_json::json!(views::CostsView::of(by.group().name(), &lines))
        );
        return Ok(exit::OK);
    }
    let mut rows = vec![[
        format!("{by:?}").to_uppercase(),
        "CALLS".into(),
        "TOKENS".into(),
        "COST".into(),
    ]];
    for l in &lines {
        rows.push([
            l.key.clone(),
            l.calls.to_string(),
            l.usage.total().to_string(),
            l.cost.to_string(),
        ]);
    }
    rows.push([
        "total".into(),
        lines.iter().map(|l| l.calls).sum::<u64>().to_string(),
        lines
            .iter()
            .map(|l| l.usage.total())
            .sum::<u64>()
            .to_string(),
        total.to_string(),
    ]);
    say!("{}", render::table(&rows));
    Ok(exit::OK)
}
