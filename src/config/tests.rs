//! Layering, validation and defaults of the configuration.

use super::*;

#[test]
fn defaults_are_zero_config() {
    let s = Settings::from_options(ServeOptions::default()).unwrap();
    assert_eq!(s.listen.to_string(), "127.0.0.1:8080");
    assert_eq!(s.data_dir, PathBuf::from("storage"));
    assert_eq!(s.max_upload_bytes, 8 << 30);
}

#[test]
fn non_loopback_needs_public_url() {
    let o = ServeOptions {
        listen: Some("0.0.0.0:8080".parse().unwrap()),
        ..Default::default()
    };
    assert!(Settings::from_options(o.clone()).is_err());
    let o = ServeOptions {
        public_url: Some("https://fw.example.com".into()),
        ..o
    };
    assert!(Settings::from_options(o).is_ok());
}

#[test]
fn flag_beats_file() {
    let file: ServeOptions =
        toml::from_str("listen = \"127.0.0.1:9000\"\nmax_concurrent_uploads = 4\n").unwrap();
    let flags = ServeOptions {
        listen: Some("127.0.0.1:9001".parse().unwrap()),
        ..Default::default()
    };
    let merged = flags.over(file);
    assert_eq!(merged.listen.unwrap().port(), 9001);
    assert_eq!(merged.max_concurrent_uploads, Some(4));
    assert!(toml::from_str::<ServeOptions>("no_such_key = 1").is_err());
}

#[test]
fn blob_store_urls() {
    let b = BlobBackend::parse(Some("s3://bucket/a/b/"), Path::new("x"), None).unwrap();
    assert_eq!(
        b,
        BlobBackend::S3 {
            bucket: "bucket".into(),
            prefix: "a/b".into(),
            endpoint: None
        }
    );
    assert!(BlobBackend::parse(Some("ftp://x"), Path::new("x"), None).is_err());
}
