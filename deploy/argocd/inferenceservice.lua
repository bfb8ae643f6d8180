-- Argo CD health check for kubeforge.io/InferenceService
-- (argocd-cm: resource.customizations.health.kubeforge.io_InferenceService).
-- Written for Argo CD's Lua 5.1 (gopher-lua). Healthy while the Ready condition holds
-- (the serving pods answer), Degraded when it Failed or its spec was refused,
-- Progressing while the model is awaited or replicas come up.
local hs = { status = "Progressing", message = "Waiting for the KubeForge operator" }

local function condition(st, t)
  if st.conditions == nil then return nil end
  for _, c in ipairs(st.conditions) do
    if c.type == t then return c end
  end
  return nil
end

local st = obj.status
if st == nil then return hs end
local generation = obj.metadata.generation
if st.observedGeneration == nil or (generation ~= nil and st.observedGeneration < generation) then
  hs.message = "Waiting for the operator to observe generation " .. tostring(generation)
  return hs
end

local accepted = condition(st, "Accepted")
if accepted ~= nil and accepted.status == "False" then
  hs.status = "Degraded"
  hs.message = "Spec rejected: " .. (accepted.message or accepted.reason or "")
  return hs
end

local phase = st.phase or "Pending"
local ready = condition(st, "Ready")
local replicas = ""
if st.replicas ~= nil then
  replicas = tostring(st.replicas.ready or 0) .. "/" .. tostring(st.replicas.desired or 0) .. " replicas ready"
end
if phase == "Failed" then
  hs.status = "Degraded"
  hs.message = "Failed"
  if ready ~= nil and ready.message ~= nil and ready.message ~= "" then hs.message = "Failed: " .. ready.message end
elseif ready ~= nil and ready.status == "True" then
  hs.status = "Healthy"
  hs.message = "Serving"
  if st.url ~= nil then hs.message = hs.message .. " at " .. st.url end
  if replicas ~= "" then hs.message = hs.message .. " (" .. replicas .. ")" end
elseif phase == "WaitingForInput" then
  local model = condition(st, "ModelReady")
  hs.message = "Waiting for its model"
  if model ~= nil and model.message ~= nil and model.message ~= "" then hs.message = hs.message .. ": " .. model.message end
else
  hs.message = phase
  if replicas ~= "" then hs.message = hs.message .. ": " .. replicas end
end
return hs
