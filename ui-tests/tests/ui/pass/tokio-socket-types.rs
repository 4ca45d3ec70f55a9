//! The four tokio socket types, on every network each serves.

use tableflip::{Context, listener};
use tokio::net::{TcpListener, UdpSocket, UnixDatagram, UnixListener};

#[listener("tcp", "127.0.0.1:0")]
static TCP: TcpListener;

#[listener("tcp4", "127.0.0.1:0")]
static TCP4: TcpListener;

#[listener("tcp6", "[::1]:0")]
static TCP6: TcpListener;

#[listener("udp", "127.0.0.1:0")]
static UDP: UdpSocket;

#[listener("udp4", "127.0.0.1:0")]
static UDP4: UdpSocket;

#[listener("udp6", "[::1]:0")]
static UDP6: UdpSocket;

#[listener("unix", "/tmp/tableflip-ui-tests-tokio-socket-types.sock")]
static UNIX: UnixListener;

#[listener("unixgram", "@tableflip-ui-tests-tokio-socket-types")]
static UNIXGRAM: UnixDatagram;

#[tableflip::main]
async fn main(_cx: Context) -> std::io::Result<()> {
    let tcp = TCP.take()?;
    let tcp4 = TCP4.take()?;
    let tcp6 = TCP6.take()?;
    let udp = UDP.take()?;
    let udp4 = UDP4.take()?;
    let udp6 = UDP6.take()?;
    let unix = UNIX.take()?;
    let unixgram = UNIXGRAM.take()?;
    assert!(tcp.local_addr()?.is_ipv4() && tcp4.local_addr()?.is_ipv4());
    assert!(tcp6.local_addr()?.is_ipv6());
    assert!(udp.local_addr()?.is_ipv4() && udp4.local_addr()?.is_ipv4());
    assert!(udp6.local_addr()?.is_ipv6());
    drop((unix, unixgram));
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
