output "node_pool" {
  description = "Name of the GPU node pool."
  value       = google_container_node_pool.gpu.name
}

output "node_selector" {
  description = "nodeSelector that places a pod on the pool (from infra/gpu_pool.json)."
  value       = { (local.gpu_pool.node_selector.key) = local.gpu_pool.node_selector.value }
}

output "toleration" {
  description = "Toleration a pod needs for the pool's taint (from infra/gpu_pool.json)."
  value       = local.gpu_pool.toleration
}

output "multi_gpu_node_pool" {
  description = "Name of the multi-GPU node pool (null when multi_gpu_max_nodes = 0)."
  value       = one(google_container_node_pool.gpu_multi[*].name)
}
