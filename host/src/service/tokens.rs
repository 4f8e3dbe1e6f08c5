//! API tokens: made here, shown once, stored as a hash. A token reads
//! `cairn_<id>_<secret>`: the id finds its row, and the secret's SHA-256 is
//! compared with the stored one in constant time.

use sha2::{Digest, Sha256};

use super::{Service, ServiceError};
use crate::model::{Role, TokenRecord, now_ms};
use crate::store::{Write, commit};

const PREFIX: &str = "cairn_";

/// A token just made: its record, and the token itself (shown once).
#[derive(Debug)]
pub struct NewToken {
    pub record: TokenRecord,
    pub token: String,
}

/// Why a presented token does not authenticate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Missing, malformed, unknown, wrong or revoked: all look the same.
    Unauthorized,
    /// Valid, but its role is below the one needed.
    Forbidden,
}

fn random_hex(bytes: usize) -> Result<String, ServiceError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf)
        .map_err(|e| ServiceError::Store(crate::store::StoreError::Backend(format!("no randomness: {e}"))))?;
    Ok(hex::encode(buf))
}

fn secret_hash(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Equal, in a time that does not depend on where they differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    std::hint::black_box(a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y))) == 0
}

/// A token's name: 1 to 64 of `A-Z a-z 0-9 - _ .`.
fn check_name(name: &str) -> Result<(), ServiceError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ServiceError::BadInput(format!("token name {name:?} is not valid: use 1 to 64 of A-Z a-z 0-9 - _ .")))
    }
}

impl Service {
    /// Make a token with `role`, named `name` (or after its id).
    pub async fn create_token(&self, role: Role, name: Option<&str>) -> Result<NewToken, ServiceError> {
        let id = random_hex(8)?;
        let name = match name {
            Some(n) => {
                check_name(n)?;
                n.to_string()
            }
            None => format!("token-{id}"),
        };
        let secret = random_hex(32)?;
        let record = TokenRecord {
            id: id.clone(),
            name,
            role,
            hash: secret_hash(&secret),
            created_at: now_ms(),
            revoked_at: None,
        };
        commit(&**self.store(), vec![Write::CreateToken { token: record.clone() }]).await?;
        Ok(NewToken { record, token: format!("{PREFIX}{id}_{secret}") })
    }

    /// Every token, oldest first; never the tokens themselves.
    pub async fn list_tokens(&self) -> Result<Vec<TokenRecord>, ServiceError> {
        Ok(self.store().tokens().await?)
    }

    /// Revoke a token by id or name: refused from the next request on.
    pub async fn revoke_token(&self, id_or_name: &str) -> Result<(), ServiceError> {
        commit(&**self.store(), vec![Write::RevokeToken { id_or_name: id_or_name.to_string() }]).await?;
        Ok(())
    }

    /// Whether any token can still be used (a server with none refuses every request).
    pub async fn has_live_tokens(&self) -> Result<bool, ServiceError> {
        Ok(self.store().tokens().await?.iter().any(|t| t.revoked_at.is_none()))
    }

    /// The token `presented` stands for, if it is live and at least `need`.
    pub async fn authenticate(&self, presented: &str, need: Role) -> Result<TokenRecord, AuthError> {
        let (id, secret) =
            presented.strip_prefix(PREFIX).and_then(|t| t.split_once('_')).ok_or(AuthError::Unauthorized)?;
        let record = match self.store().token(id).await {
            Ok(Some(r)) => r,
            _ => return Err(AuthError::Unauthorized),
        };
        if !same(&record.hash, &secret_hash(secret)) || record.revoked_at.is_some() {
            return Err(AuthError::Unauthorized);
        }
        if record.role < need {
            return Err(AuthError::Forbidden);
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::store::sqlite::SqliteStore;

    #[tokio::test]
    async fn tokens_authenticate_by_role_until_revoked() {
        let path = crate::store::sqlite::tests::temp_db("tokens");
        let store = Arc::new(SqliteStore::open(&path, crate::store::Durability::Process).unwrap());
        let service = Service::new(store);
        let op = service.create_token(Role::Operator, Some("ci")).await.unwrap();
        assert!(op.token.starts_with("cairn_") && !op.token.contains(' '));
        assert_eq!(service.authenticate(&op.token, Role::Viewer).await.unwrap().name, "ci");
        assert_eq!(service.authenticate(&op.token, Role::Operator).await.unwrap().role, Role::Operator);
        assert_eq!(service.authenticate(&op.token, Role::Admin).await, Err(AuthError::Forbidden));
        let wrong = format!("{}x", &op.token[..op.token.len() - 1]);
        assert_eq!(service.authenticate(&wrong, Role::Viewer).await, Err(AuthError::Unauthorized));
        assert_eq!(service.authenticate("nonsense", Role::Viewer).await, Err(AuthError::Unauthorized));
        assert!(matches!(service.create_token(Role::Admin, Some("ci")).await, Err(ServiceError::TokenExists(_))));
        service.revoke_token("ci").await.unwrap();
        assert_eq!(service.authenticate(&op.token, Role::Viewer).await, Err(AuthError::Unauthorized));
        assert!(!service.has_live_tokens().await.unwrap());
        let listed = service.list_tokens().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert!(listed[0].revoked_at.is_some());
    }
}
