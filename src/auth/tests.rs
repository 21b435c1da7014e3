//! Tokens against the sled catalog.

use super::*;
use crate::catalog::Catalog;

async fn service() -> (TokenService, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::open(&dir.path().join("c"), 8).unwrap();
    (TokenService::load(Arc::new(catalog)).await.unwrap(), dir)
}

#[tokio::test]
async fn bootstrap_writes_a_private_admin_token_once() {
    let (svc, dir) = service().await;
    let path = svc.bootstrap(dir.path()).await.unwrap().unwrap();
    let token = std::fs::read_to_string(&path).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let p = svc
        .authenticate(Some(&format!("Bearer {}", token.trim())))
        .unwrap();
    assert!(p.allows(Scope::Admin) && p.allows(Scope::Upload));
    assert!(svc.bootstrap(dir.path()).await.unwrap().is_none());
    // Stored as a hash only.
    let stored = svc.store.all_tokens().await.unwrap();
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].hash, hash_of(token.trim()));
    assert!(
        !serde_json::to_string(&stored[0])
            .unwrap()
            .contains(token.trim())
    );
}

#[tokio::test]
async fn scopes_revocation_expiry_and_malformed_headers() {
    let (svc, _dir) = service().await;
    let (rec, up) = svc
        .create(
            NewToken {
                name: "ci".into(),
                scopes: vec![Scope::Upload],
                expires_at: None,
            },
            None,
        )
        .await
        .unwrap();
    let p = svc.authenticate(Some(&format!("bearer {up}"))).unwrap();
    assert!(p.allows(Scope::Upload) && p.allows(Scope::Read));
    assert!(!p.allows(Scope::Operate) && !p.allows(Scope::Admin));
    for bad in ["", "Bearer", "Basic abc", "Bearer  ", "Token x"] {
        assert!(matches!(
            svc.authenticate(Some(bad)),
            Err(AuthError::Malformed)
        ));
    }
    assert!(matches!(svc.authenticate(None), Err(AuthError::Missing)));
    assert!(matches!(
        svc.authenticate(Some("Bearer fwr_nope")),
        Err(AuthError::Unknown)
    ));
    svc.revoke(&rec.id).await.unwrap();
    assert!(matches!(
        svc.authenticate(Some(&format!("Bearer {up}"))),
        Err(AuthError::Revoked)
    ));
    let past = NewToken {
        name: "old".into(),
        scopes: vec![Scope::Read],
        expires_at: Some(Utc::now() - chrono::Duration::seconds(1)),
    };
    assert!(matches!(
        svc.create(past, None).await,
        Err(AuthError::Invalid(_))
    ));
    let empty = NewToken {
        name: "x".into(),
        scopes: vec![],
        expires_at: None,
    };
    assert!(matches!(
        svc.create(empty, None).await,
        Err(AuthError::Invalid(_))
    ));
}
