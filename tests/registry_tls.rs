//! The registry client over TLS: a private CA, a client certificate (mutual TLS), and hostname
//! verification that refuses a certificate for another name.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use schema_registry::{RegistryClient, RegistryConfig, SchemaId};

fn openssl(dir: &Path, args: &[&str]) {
    let ok = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stderr(Stdio::null())
        .status()
        .expect("openssl")
        .success();
    assert!(ok, "openssl {args:?}");
}

/// A CA, a server certificate for `san`, and a client certificate, in `dir`.
fn certificates(dir: &Path, san: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=lakesink test CA",
        ],
    );
    for (name, ext) in [
        ("server", format!("subjectAltName={san}")),
        ("client", "extendedKeyUsage=clientAuth".into()),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
    }
}

async fn serve(dir: &Path) -> (std::process::Child, u16) {
    let port_file = dir.join("port");
    let mut child = Command::new(python())
        .arg(py_script("tls_registry.py"))
        .args(["server.pem", "server.key", "ca.pem"])
        .arg(&port_file)
        .current_dir(dir)
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if let Some(p) = std::fs::read_to_string(&port_file)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return (child, p);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the TLS registry did not start");
}

fn config(url: String, dir: &Path, client_cert: bool) -> RegistryConfig {
    let mut c = RegistryConfig::new(url);
    c.ca_file = Some(dir.join("ca.pem"));
    if client_cert {
        c.client_cert_file = Some(dir.join("client.pem"));
        c.client_key_file = Some(dir.join("client.key"));
    }
    c.attempts = 1;
    c
}

#[tokio::test(flavor = "multi_thread")]
async fn private_ca_client_certificate_and_hostname_verification() {
    let dir = scratch("tls");
    certificates(&dir, "IP:127.0.0.1,DNS:localhost");
    let (mut server, port) = serve(&dir).await;
    let url = format!("https://127.0.0.1:{port}");

    // CA + client certificate: works.
    let c = RegistryClient::new(config(url.clone(), &dir, true)).unwrap();
    assert!(c
        .schema(SchemaId(1))
        .await
        .unwrap()
        .schema
        .contains("\"x\""));
    // No client certificate: the server refuses the handshake.
    let c = RegistryClient::new(config(url.clone(), &dir, false)).unwrap();
    assert!(c.schema(SchemaId(1)).await.is_err());
    // Without the private CA the server certificate is not trusted.
    let mut no_ca = config(url.clone(), &dir, true);
    no_ca.ca_file = None;
    assert!(RegistryClient::new(no_ca)
        .unwrap()
        .schema(SchemaId(1))
        .await
        .is_err());
    let _ = server.kill();
    let _ = server.wait();

    // A certificate for another host name is refused (hostname verification is on).
    let other = scratch("tls-other");
    certificates(&other, "DNS:registry.example.com");
    let (mut server, port) = serve(&other).await;
    let c = RegistryClient::new(config(format!("https://127.0.0.1:{port}"), &other, true)).unwrap();
    let e = c.schema(SchemaId(1)).await.unwrap_err();
    assert!(
        matches!(e, schema_registry::Error::Unreachable { .. }),
        "{e}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
