//! `socket2::Socket`, through the re-export, serves `unixpacket`.

use tableflip::socket2::Socket;
use tableflip::{Context, listener};

#[listener("unixpacket", "@tableflip-ui-tests-socket2-unixpacket")]
static PACKET: Socket;

#[tableflip::main]
async fn main(_cx: Context) -> std::io::Result<()> {
    let packet = PACKET.take()?;
    assert_eq!(packet.r#type()?, tableflip::socket2::Type::SEQPACKET);
    tableflip_ui_tests::stop_after_init();
    Ok(())
}
