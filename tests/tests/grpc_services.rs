//! Every gRPC port serves `grpc.health.v1` and server reflection, directly and
//! through the gateway, so grpcurl and generated clients work unchanged.

use futures::StreamExt;
use meridian_tests::{ClusterSandbox, init_logging};
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

async fn channel(url: String) -> Channel {
    tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn listed_services(channel: Channel) -> Vec<String> {
    let mut client = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = client
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let first = responses.next().await.unwrap().unwrap();
    match first.message_response.unwrap() {
        MessageResponse::ListServicesResponse(list) => {
            list.service.into_iter().map(|s| s.name).collect()
        }
        other => panic!("unexpected reflection answer {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_reflection_on_region_and_gateway() {
    init_logging();
    let sandbox = ClusterSandbox::start(&["eu-west"]).await;
    for url in [sandbox.regions[0].url(), sandbox.gateway_url()] {
        let mut health = HealthClient::new(channel(url.clone()).await);
        for service in ["", "meridian.v1.Inference"] {
            let status = health
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .unwrap()
                .into_inner()
                .status;
            assert_eq!(status, ServingStatus::Serving as i32, "{url} {service:?}");
        }
        let unknown = health
            .check(HealthCheckRequest {
                service: "meridian.v1.Nope".into(),
            })
            .await
            .unwrap_err();
        assert_eq!(unknown.code(), tonic::Code::NotFound);

        let services = listed_services(channel(url.clone()).await).await;
        for expected in ["meridian.v1.Inference", "grpc.health.v1.Health"] {
            assert!(
                services.iter().any(|s| s == expected),
                "{url}: {services:?}"
            );
        }
    }
}
