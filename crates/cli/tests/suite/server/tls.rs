//! TLS built in.

use super::*;

#[test]
fn tls_is_built_in() {
    let t = tempdir();
    let (cert, key) = (t.path().join("cert.pem"), t.path().join("key.pem"));
    let ca = t.path().join("ca.pem");
    // a CA and a leaf for 127.0.0.1 signed by it (a self-signed CA used as
    // the server's own certificate is rightly refused by webpki)
    let script = r#"set -e
      openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 -subj /CN=test-ca -keyout ca.key -out ca.pem 2>/dev/null
      openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=localhost -keyout key.pem -out leaf.csr 2>/dev/null
      printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' > ext.cnf
      openssl x509 -req -in leaf.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 -extfile ext.cnf -out cert.pem 2>/dev/null"#;
    let o = sh(t.path(), script);
    assert!(
        o.status.success(),
        "openssl (apt-get install openssl): {o:?}"
    );
    let (c, k) = (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    );
    let s = Server::start(&t.path().join("data"), &["--tls-cert", &c, "--tls-key", &k]);
    assert!(s.url.starts_with("https://"), "{}", s.url);
    let pem = std::fs::read(&ca).unwrap_or_default();
    let ca = reqwest::Certificate::from_pem(&pem).unwrap();
    let https = Client::builder().add_root_certificate(ca).build().unwrap();
    let r = https
        .get(format!("{}/health", s.url))
        .send()
        .unwrap_or_else(|e| panic!("{e:?}"));
    assert_eq!(r.status().as_u16(), 200);
    // plain HTTP to the TLS port gets no answer
    let plain = s.url.replacen("https://", "http://", 1);
    let r = Client::new().get(format!("{plain}/health")).send();
    assert!(r.map(|r| !r.status().is_success()).unwrap_or(true));
}
