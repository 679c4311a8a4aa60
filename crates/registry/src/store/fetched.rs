//! CRLs fetched from other CAs' distribution points, kept in the registry so that every node
//! of a cluster shares them: the last good CRL of each URL (and the CA certificate it was
//! verified against), and the last failure. The node verifies a CRL before it stores it and
//! again when it reads it back.

use sqlx::Row;

use super::{Store, with_pool};
use crate::RegistryError;

/// The largest CRL kept (bytes of DER).
pub const MAX_FETCHED_CRL_BYTES: usize = 16 * 1024 * 1024;

/// One distribution point's state.
#[derive(Debug, Clone)]
pub struct FetchedCrl {
    /// The URL.
    pub url: String,
    /// The CA certificate (DER) the CRL is verified against.
    pub issuer_der: Vec<u8>,
    /// The last good CRL (DER), if one was ever fetched.
    pub crl_der: Option<Vec<u8>>,
    /// When it was fetched (seconds since the epoch).
    pub fetched_at: Option<i64>,
    /// Its nextUpdate.
    pub next_update: Option<i64>,
    /// The last failure, if the last attempt failed.
    pub error: Option<String>,
    /// When that attempt failed.
    pub failed_at: Option<i64>,
}

/// A row of `fetched_crls` as a [`FetchedCrl`] (for either database's row type).
macro_rules! fetched_row {
    ($r:expr) => {
        (|| -> Result<FetchedCrl, RegistryError> {
            Ok(FetchedCrl {
                url: $r.try_get("url")?,
                issuer_der: $r.try_get("issuer_der")?,
                crl_der: $r.try_get("crl_der")?,
                fetched_at: $r.try_get("fetched_at")?,
                next_update: $r.try_get("next_update")?,
                error: $r.try_get("error")?,
                failed_at: $r.try_get("failed_at")?,
            })
        })()
    };
}

impl Store {
    /// Every distribution point known.
    pub async fn fetched_crls(&self) -> Result<Vec<FetchedCrl>, RegistryError> {
        with_pool!(self, pool => {
            let rows = sqlx::query("SELECT url, issuer_der, crl_der, fetched_at, next_update, error, failed_at FROM fetched_crls ORDER BY url")
                .fetch_all(pool)
                .await?;
            rows.iter().map(|r| fetched_row!(r)).collect()
        })
    }

    /// One distribution point's state.
    pub async fn fetched_crl(&self, url: &str) -> Result<Option<FetchedCrl>, RegistryError> {
        with_pool!(self, pool => {
            let row = sqlx::query("SELECT url, issuer_der, crl_der, fetched_at, next_update, error, failed_at FROM fetched_crls WHERE url = $1")
                .bind(url)
                .fetch_optional(pool)
                .await?;
            row.as_ref().map(|r| fetched_row!(r)).transpose()
        })
    }

    /// Records a CRL fetched (and verified) from `url` at `at`, unless a newer fetch is
    /// already recorded; clears the failure.
    pub async fn put_fetched_crl(
        &self,
        url: &str,
        issuer_der: &[u8],
        crl_der: &[u8],
        next_update: Option<i64>,
        at: i64,
    ) -> Result<(), RegistryError> {
        if crl_der.len() > MAX_FETCHED_CRL_BYTES {
            return Err(RegistryError::Invalid(format!(
                "the CRL from {url} exceeds 16 MiB"
            )));
        }
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO fetched_crls (url, issuer_der, crl_der, fetched_at, next_update) VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (url) DO UPDATE SET issuer_der = $2, crl_der = $3, fetched_at = $4, next_update = $5, error = NULL, failed_at = NULL \
                         WHERE fetched_crls.fetched_at IS NULL OR fetched_crls.fetched_at <= $4")
                .bind(url)
                .bind(issuer_der)
                .bind(crl_der)
                .bind(at)
                .bind(next_update)
                .execute(pool)
                .await?;
            Ok(())
        })
    }

    /// Records that fetching `url` failed at `at` (the last good CRL, if any, is kept).
    pub async fn fetched_crl_failed(
        &self,
        url: &str,
        issuer_der: &[u8],
        error: &str,
        at: i64,
    ) -> Result<(), RegistryError> {
        let error: String = error.chars().take(500).collect();
        with_pool!(self, pool => {
            sqlx::query("INSERT INTO fetched_crls (url, issuer_der, error, failed_at) VALUES ($1, $2, $3, $4) \
                         ON CONFLICT (url) DO UPDATE SET error = $3, failed_at = $4")
                .bind(url)
                .bind(issuer_der)
                .bind(&error)
                .bind(at)
                .execute(pool)
                .await?;
            Ok(())
        })
    }
}
