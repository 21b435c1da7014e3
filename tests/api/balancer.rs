//! nginx in front of several replicas: round robin, the next replica when one does not
//! answer, downloads streamed through (the load balancer of a deployment of several replicas).

use std::path::Path;
use std::time::{Duration, Instant};

/// Whether `nginx` is on PATH.
pub fn have_nginx() -> bool {
    std::process::Command::new("nginx")
        .arg("-v")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok()
}

/// An nginx of the test's own on a loopback port.
pub struct Nginx(std::process::Child);

impl Nginx {
    /// Starts nginx on `port`, balancing over `upstreams` ("host:port").
    pub fn start(dir: &Path, port: u16, upstreams: &[&str]) -> Nginx {
        let servers: String = upstreams
            .iter()
            .map(|u| format!("server {u} max_fails=1 fail_timeout=5s;\n"))
            .collect();
        let d = dir.display();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "worker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{\n access_log off;\n client_body_temp_path {d}/body;\n\
                 proxy_temp_path {d}/proxy;\n fastcgi_temp_path {d}/fcgi;\n\
                 uwsgi_temp_path {d}/uwsgi;\n scgi_temp_path {d}/scgi;\n\
                 upstream fwrepo {{\n{servers}}}\n\
                 server {{\n listen 127.0.0.1:{port};\n client_max_body_size 0;\n\
                 proxy_buffering off;\n proxy_request_buffering off;\n\
                 location / {{\n proxy_pass http://fwrepo;\n proxy_http_version 1.1;\n\
                 proxy_set_header Connection \"\";\n proxy_connect_timeout 2s;\n\
                 proxy_read_timeout 300s;\n proxy_next_upstream error timeout http_502 http_503;\n\
                 }}\n }}\n}}\n"
            ),
        )
        .unwrap();
        let mut cmd = std::process::Command::new("nginx");
        cmd.arg("-c").arg(&conf).args(["-g", "daemon off;"]);
        // As root, nginx's workers would run as `nobody`: keep them this user.
        if is_root() {
            cmd.args(["-g", "user root;"]);
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nginx on PATH");
        let up = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                up.elapsed() < Duration::from_secs(10),
                "nginx did not listen: {}",
                std::fs::read_to_string(dir.join("nginx-error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Nginx(child)
    }
}

/// Whether this process runs as root (nginx then needs `user root;` for its workers).
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
